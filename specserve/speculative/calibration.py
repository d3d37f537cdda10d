"""Calibration of the drafter's confidence head by sequential temperature scaling (STS).

The prefix scheduler multiplies conditional confidences into survival probabilities
a_k = prod_{i<=k} c_i, so what must be calibrated is that product. STS fits one temperature per
draft position, left to right: T_k minimises the expected calibration error (ECE) of a_k against
the label "positions 1..k all accepted", with T_1..T_{k-1} already fixed.

Shapes: N draft blocks, K positions. `mask[n, k]` marks positions that were drafted (their
confidence logit exists). Do not mask positions after the first rejection: the survival label
is a cumulative product of accept flags, so flags after a rejection are ignored anyway.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

# Keep calibrated confidences strictly inside (0, 1) so survival products stay informative.
_CONF_EPS = 1e-6


def expected_calibration_error(
    probs: Tensor, labels: Tensor, n_bins: int = 15, mask: Tensor | None = None
) -> float:
    """ECE with n_bins equal-width bins on [0, 1]: sum_b (n_b / n) |mean(prob_b) - mean(label_b)|.

    probs [...] float in [0, 1], labels [...] bool or {0, 1}, mask [...] bool (None = all).
    Returns 0.0 when no entry is selected.
    """
    if mask is not None:
        probs, labels = probs[mask], labels[mask]
    return float(_ece_rows(probs.reshape(1, -1), labels.reshape(-1), n_bins)[0])


def fit_sts(
    conf_logits: Tensor,
    accepted: Tensor,
    mask: Tensor | None = None,
    grid: Tensor | None = None,
    n_bins: int = 15,
) -> Tensor:
    """Sequential temperature scaling: conf_logits [N, K], accepted [N, K] bool -> temperatures [K].

    mask [N, K] bool marks drafted positions (None = all); a block counts at position k only if
    positions 0..k were all drafted. grid [G] candidate temperatures (default 0.05..20,
    log-spaced). Positions with no data keep T = 1.
    """
    grid = _default_grid() if grid is None else grid.double()
    if grid.numel() == 0 or not bool((grid > 0).all()):
        raise ValueError("temperature grid must be non-empty and positive")
    logits = conf_logits.double()
    grid = grid.to(logits.device)
    survived = _survival_labels(accepted)
    present = _present(mask, logits)
    temperatures = torch.ones(logits.shape[1], dtype=torch.float64, device=logits.device)
    # prefix[n] = prod_{i<k} sigmoid(z_i / T_i) with the temperatures fitted so far.
    prefix = torch.ones(logits.shape[0], dtype=torch.float64, device=logits.device)
    for k in range(logits.shape[1]):
        rows = present[:, k]
        if rows.any():
            scaled = torch.sigmoid(logits[rows, k][None, :] / grid[:, None])  # [G, n]
            candidates = prefix[rows][None, :] * scaled
            ece = _ece_rows(candidates, survived[rows, k], n_bins)
            temperatures[k] = grid[int(ece.argmin())]
        prefix = prefix * torch.sigmoid(logits[:, k] / temperatures[k])
    return temperatures.float().cpu()


def apply_sts(conf_logits: Tensor, temperatures: Tensor) -> Tensor:
    """Calibrated conditional confidences: conf_logits [..., K], temperatures [K] -> [..., K] in (0, 1)."""
    if temperatures.shape != conf_logits.shape[-1:]:
        raise ValueError(
            f"need one temperature per position: {tuple(temperatures.shape)} vs logits "
            f"{tuple(conf_logits.shape)}"
        )
    t = temperatures.to(device=conf_logits.device, dtype=conf_logits.dtype)
    return torch.sigmoid(conf_logits / t).clamp(_CONF_EPS, 1.0 - _CONF_EPS)


def survival_ece(
    conf_logits: Tensor,
    accepted: Tensor,
    temperatures: Tensor | None = None,
    mask: Tensor | None = None,
    n_bins: int = 15,
) -> list[float]:
    """Per-position ECE of the survival prod_{i<=k} c_i against 'positions 0..k all accepted'.

    conf_logits [N, K], accepted [N, K] bool, temperatures [K] (None = raw, T = 1) -> K floats.
    For the ece_before / ece_after report of `save_sts`.
    """
    t = torch.ones(conf_logits.shape[1]) if temperatures is None else temperatures
    survival = apply_sts(conf_logits.double(), t.double()).cumprod(dim=1)
    survived = _survival_labels(accepted)
    present = _present(mask, conf_logits)
    return [
        expected_calibration_error(survival[:, k], survived[:, k], n_bins, present[:, k])
        for k in range(conf_logits.shape[1])
    ]


def save_sts(
    path: str | Path,
    temperatures: Tensor,
    ece_before: list[float] | None = None,
    ece_after: list[float] | None = None,
) -> None:
    """Write JSON {"temperatures": [...], "ece_before": [...], "ece_after": [...]} (ECEs optional)."""
    data: dict[str, list[float]] = {"temperatures": [float(t) for t in temperatures]}
    if ece_before is not None:
        data["ece_before"] = [float(e) for e in ece_before]
    if ece_after is not None:
        data["ece_after"] = [float(e) for e in ece_after]
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def load_sts(path: str | Path) -> Tensor:
    """Temperatures [K] float32 from a file written by `save_sts`; ValueError if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"STS file {path}: not valid JSON ({e})") from e
    temps = data.get("temperatures") if isinstance(data, dict) else None
    if (
        not isinstance(temps, list)
        or not temps
        or not all(type(t) in (int, float) and math.isfinite(t) and t > 0 for t in temps)
    ):
        raise ValueError(
            f"STS file {path}: need 'temperatures', a non-empty list of positive numbers"
        )
    return torch.tensor(temps, dtype=torch.float32)


def _ece_rows(probs: Tensor, labels: Tensor, n_bins: int) -> Tensor:
    """ECE of each row of probs [G, M] against labels [M] -> [G] float64."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    g, m = probs.shape
    if m == 0:
        return torch.zeros(g, dtype=torch.float64)
    probs = probs.double()
    labels = labels.double().expand(g, m)
    bins = (probs * n_bins).long().clamp(0, n_bins - 1)
    gap = torch.zeros(g, n_bins, dtype=torch.float64, device=probs.device)
    gap.scatter_add_(1, bins, probs - labels)
    # sum_b (n_b/n)|mean p_b - mean y_b| = sum_b |sum_{i in b} (p_i - y_i)| / n
    return gap.abs().sum(dim=1) / m


def _survival_labels(accepted: Tensor) -> Tensor:
    """[N, K] bool: positions 0..k all accepted."""
    return accepted.bool().long().cumprod(dim=1).bool()


def _present(mask: Tensor | None, logits: Tensor) -> Tensor:
    """[N, K] bool: positions 0..k all drafted."""
    if mask is None:
        return torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    return mask.bool().long().cumprod(dim=1).bool()


def _default_grid() -> Tensor:
    return torch.logspace(math.log10(0.05), math.log10(20.0), 241, dtype=torch.float64)
