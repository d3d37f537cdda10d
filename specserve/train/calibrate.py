"""Calibrate a DSpark confidence head by sequential temperature scaling on held-out data.

Every position of the held-out continuations is an anchor; the drafter drafts a block there
and each slot's accept flag is drawn as in serving (greedy match at temperature 0, a
min(1, p/q) coin at temperature 1). Every other sequence fits the temperatures
(`spec/calibration.fit_sts`), the rest report the survival ECE before and after
(`fit_and_report`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from specserve.speculative.calibration import fit_sts, save_sts, survival_ece
from specserve.train.evaluate import continuations, drafts_and_alpha


@torch.no_grad()
def collect(target, drafter, seqs, prompt_len, k, temperature, batch_size=8, seed=0):
    """-> confidence logits [N, K], accept flags [N, K] bool, sequence index [N]."""
    gen = torch.Generator().manual_seed(seed)
    logits, flags, owner = [], [], []
    for i in range(0, len(seqs), batch_size):
        batch = seqs[i : i + batch_size]
        drafts, alpha = drafts_and_alpha(
            target, drafter, "dspark", batch, prompt_len, k, temperature, gen
        )
        if drafts.confidence_logits is None:
            raise ValueError("the drafter has no confidence head (enable_confidence_head)")
        flips = torch.rand(alpha.shape, generator=gen) < alpha.cpu()
        logits.append(drafts.confidence_logits.cpu().reshape(-1, k))
        flags.append(flips.reshape(-1, k))
        b, a = alpha.shape[:2]
        owner.append((torch.arange(b)[:, None] + i).expand(b, a).reshape(-1))
    return torch.cat(logits), torch.cat(flags), torch.cat(owner)


def calibrate(
    drafter_dir,
    data_dir,
    target_dir=None,
    temperature: float = 1.0,
    out=None,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """Fit, write `sts.json` (default: in the drafter folder) and return the report."""
    from specserve.models.loader import load_model
    from specserve.speculative.checkpoint import load_drafter
    from specserve.speculative.handle import TargetHandle
    from specserve.train.gendata import dataset_meta

    target_dir = target_dir or dataset_meta(data_dir).get("target")
    if not target_dir:
        raise ValueError(f"{data_dir}: meta.json names no target; pass --target")
    target, _ = load_model(target_dir, device=device)
    drafter = load_drafter(drafter_dir, TargetHandle.of(target), device=device)
    seqs, p, _ = continuations(target, data_dir, temperature, seed=seed)
    k = drafter.block_size
    conf, acc, owner = collect(target, drafter, seqs.to(device), p, k, temperature, seed=seed)
    temps, before, after, fit = fit_and_report(conf, acc, owner)
    out = Path(out) if out else Path(drafter_dir) / "sts.json"
    save_sts(out, temps, before, after)
    return {
        "sts": str(out),
        "temperatures": [round(float(t), 4) for t in temps],
        "ece_before": [round(e, 4) for e in before],
        "ece_after": [round(e, 4) for e in after],
        "fit_blocks": int(fit.sum()),
        "report_blocks": int((~fit).sum()),
    }


def fit_and_report(
    conf: torch.Tensor, acc: torch.Tensor, owner: torch.Tensor
) -> tuple[torch.Tensor, list[float], list[float], torch.Tensor]:
    """STS temperatures fitted on the blocks of the even-numbered sequences, and the survival
    ECE before and after on the odd-numbered ones. conf [N, K], acc [N, K] bool, owner [N]
    (each block's sequence) -> temperatures [K], ECE before, ECE after, the fit mask [N].

    Held-out sets list their sequences domain by domain, so a split into first and second half
    would fit on one domain and report on another (the demo bundle's code against its prose:
    every position's ECE came out worse after than before); alternate sequences put every
    domain on both sides."""
    fit = owner % 2 == 0
    temps = fit_sts(conf[fit], acc[fit])
    before = survival_ece(conf[~fit], acc[~fit])
    after = survival_ece(conf[~fit], acc[~fit], temps)
    return temps, before, after, fit
