"""Train an MTP, DFlash or DSpark drafter against a frozen target (the DeepSpec recipe).

Per step: B target-generated sequences; one no-grad target forward gives the hidden states of
`target_layer_ids` (the drafter's context) and the target's distribution at every position
(the TV / confidence labels). DFlash and DSpark then draft A random anchor blocks per sequence
in one packed forward (block-sparse mask, see `spec/dflash.py`); MTP runs its module over every
position, chained `mtp_depth` times. The embedding and LM head are the target's, frozen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specserve.models.attention import CausalAttention
from specserve.models.loader import load_model
from specserve.train.anchors import sample_anchors
from specserve.train.gendata import load_dataset
from specserve.train.loop import Checkpointer, Progress, TrainConfig, make_optimizer, write_json
from specserve.train.losses import DFLASH_WEIGHTS, DSPARK_WEIGHTS, LossParts, draft_loss

ALGORITHMS = ("mtp", "dflash", "dspark")


@dataclass(frozen=True)
class DrafterSpec:
    """What to build: the algorithm and the drafter's own hyper-parameters."""

    algorithm: str = "dspark"
    block_size: int = 7
    num_layers: int = 1
    target_layer_ids: tuple[int, ...] | None = None  # None: spread over the target's depth
    markov_rank: int = 128
    markov_head_type: str = "vanilla"
    mask_token_id: int | None = None  # None: <|im_start|>, never seen in pre-training
    anchors_per_seq: int = 16
    loss_decay_gamma: float = 4.0  # block position weights exp(-(k-1)/gamma); DeepSpec's DSpark
    mtp_depth: int = 3  # MTP: chained steps trained (and drafted at most)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}")


def default_layer_ids(num_target_layers: int, count: int = 3) -> tuple[int, ...]:
    """`count` layers evenly spaced from layer 1 to about 94% of the depth: DFlash's choice for
    Qwen3-8B ([1, 9, 17, 25, 33] of 36 layers) scaled to the target, so a shallow target
    still feeds its top layer (8 layers -> [1, 4, 7])."""
    last = num_target_layers - 1
    lo, hi = min(1, last), last - round(last * 2 / 35)
    if count == 1 or hi <= lo:
        return (hi,)
    return tuple(sorted({round(lo + i * (hi - lo) / (count - 1)) for i in range(count)}))


def build_drafter(spec: DrafterSpec, target, target_config: dict[str, Any]) -> torch.nn.Module:
    """A freshly initialised drafter sharing the target's (frozen) embedding and LM head."""
    from specserve.speculative.checkpoint import new_drafter
    from specserve.speculative.handle import TargetHandle

    dspark = spec.algorithm == "dspark"
    fields: dict[str, Any] = {}
    if spec.algorithm != "mtp":
        n = int(target_config["num_hidden_layers"])
        fields = dict(
            target_layer_ids=spec.target_layer_ids or default_layer_ids(n),
            block_size=spec.block_size,
            mask_token_id=1 if spec.mask_token_id is None else spec.mask_token_id,
            markov_rank=spec.markov_rank if dspark else 0,
            markov_head_type=spec.markov_head_type,
            enable_confidence_head=dspark,
            confidence_head_with_markov=dspark and spec.markov_rank > 0,
        )
    model = new_drafter(target_config, spec.algorithm, spec.num_layers, seed=None, **fields)
    if dspark and model.markov_head is not None:
        torch.nn.init.zeros_(model.markov_head.markov_w2.weight)  # start as plain DFlash
        torch.nn.init.normal_(model.markov_head.markov_w1.weight, 0.0, 0.02)
    model.share_target(TargetHandle.of(target))
    return model


# -- one step ----------------------------------------------------------------------------------
@torch.no_grad()
def target_states(target, input_ids: torch.Tensor, capture: tuple[int, ...]):
    """-> captured [B, T, n*H], last hidden [B, T, H] (after the final norm)."""
    b, t = input_ids.shape
    pos = torch.arange(t, device=input_ids.device).repeat(b)
    out = target(input_ids.reshape(-1), pos, CausalAttention(b, t), capture=capture)
    return out.captured.view(b, t, -1), out.hidden.view(b, t, -1)


class StateCache:
    """The frozen target's states of every training sequence, computed once (in batches of
    `chunk`) and kept in host memory, so a step runs the drafter only. The target is frozen,
    so these are exactly the states a per-step forward would give. Memory: N x T x (n+1) x H
    floats (about 2.6 GB for 4000 sequences of 160 tokens, 3 layers of width 256)."""

    def __init__(self, target, ids_all: torch.Tensor, capture: tuple[int, ...], chunk: int = 64):
        device = next(target.parameters()).device
        feats, last = [], []
        for i in range(0, len(ids_all), chunk):
            f, h = target_states(target, ids_all[i : i + chunk].to(device), capture)
            feats.append(f.cpu())
            last.append(h.cpu())
        self.feats, self.last = torch.cat(feats), torch.cat(last)

    def batch(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.feats[idx].to(device), self.last[idx].to(device)


def block_loss(
    drafter,
    target,
    input_ids: torch.Tensor,
    prompt_len: int,
    spec: DrafterSpec,
    generator: torch.Generator,
    states: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossParts:
    """DFlash / DSpark loss of one batch [B, T] of sequences (`states`: the batch's
    `target_states`, when cached)."""
    b, t = input_ids.shape
    k = drafter.block_size
    feats, last = states or target_states(target, input_ids, drafter.config.target_layer_ids)
    anchors, amask = sample_anchors(b, t, prompt_len, spec.anchors_per_seq, generator)
    anchors, amask = anchors.to(input_ids.device), amask.to(input_ids.device)
    out = drafter(input_ids, feats, anchors, amask)
    # The target's distribution of the token at anchor + k + 1 is its output at anchor + k.
    rows = (anchors[:, :, None] + torch.arange(k, device=anchors.device)).clamp(max=t - 1)
    with torch.no_grad():
        h = last.gather(1, rows.reshape(b, -1, 1).expand(-1, -1, last.shape[-1]))
        t_logits = target.compute_logits(h.reshape(-1, h.shape[-1])).view(*rows.shape, -1)
    conf = getattr(out, "confidence_logits", None)
    weights = DSPARK_WEIGHTS if conf is not None else DFLASH_WEIGHTS
    return draft_loss(
        out.logits, t_logits, out.target_ids, out.valid, conf, weights, spec.loss_decay_gamma
    )


def mtp_loss(
    mtp,
    target,
    input_ids: torch.Tensor,
    prompt_len: int,
    depth: int,
    states: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossParts:
    """MTP loss, chained `depth` steps (as `MTPModule.forward` chains); step d (1-based)
    predicts the token d + 1 ahead, weighted like block slot d. Only target-generated labels
    (position >= prompt_len) count, so only their rows go through the LM head. Depth 1 is
    DeepSeek-V3's recipe (one module trained one token ahead, chained only at inference)."""
    b, t = input_ids.shape
    p0 = max(prompt_len, 2)
    _, last = states or target_states(target, input_ids, capture_layers(mtp, "mtp"))
    with torch.no_grad():  # the target's distribution of the token at p0 + j is row j
        t_logits = target.compute_logits(last[:, p0 - 1 : t - 1].reshape(-1, last.shape[-1]))
        t_logits = t_logits.view(b, t - p0, -1)
    hidden, parts = last, []
    for d in range(depth):
        n = t - d - 1  # rows of this step; row i reads h_i and the token at i + d + 1
        x = mtp.combine(input_ids[:, d + 1 :], hidden[:, :-1]).reshape(b * n, -1)
        pos = torch.arange(n, device=input_ids.device).repeat(b)
        out = mtp.layer(x, pos, CausalAttention(b, n)).view(b, n, -1)
        first = p0 - d - 2  # first row whose label (at i + d + 2) is generated
        logits = mtp.compute_logits(out[:, first : n - 1])
        labels = input_ids[:, p0:]
        valid = torch.ones_like(labels, dtype=torch.bool)
        parts.append(
            draft_loss(
                logits[:, :, None],
                t_logits[:, :, None],
                labels[..., None],
                valid[..., None],
                None,
                DFLASH_WEIGHTS,
            )
        )
        hidden = out
    w = torch.exp(-torch.arange(depth, dtype=torch.float32) / depth)
    w = w / w.sum()
    mix = lambda name: sum(wi * getattr(p, name) for wi, p in zip(w, parts, strict=True))  # noqa: E731
    return LossParts(mix("total"), mix("ce"), mix("tv"), mix("bce"), mix("accept"))


def capture_layers(drafter, algorithm: str) -> tuple[int, ...]:
    """The target layers whose outputs the drafter reads."""
    if algorithm == "mtp":
        return (drafter.config.num_hidden_layers - 1,)
    return drafter.config.target_layer_ids


def step_loss(drafter, target, batch, prompt_len, spec, generator, states=None) -> LossParts:
    if spec.algorithm == "mtp":
        return mtp_loss(drafter, target, batch, prompt_len, spec.mtp_depth, states)
    return block_loss(drafter, target, batch, prompt_len, spec, generator, states)


# -- the run -----------------------------------------------------------------------------------
def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The drafter's own weights (shared target modules excluded)."""
    shared = tuple(f"{name}." for name in getattr(model, "SHARED", ()))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(shared)}


def train_drafter(
    spec: DrafterSpec,
    target_dir: str | Path,
    data_dir: str | Path | list[str | Path],
    out: str | Path,
    train: TrainConfig,
    resume: bool = False,
    device: str = "cpu",
    cache_states: bool = False,
) -> dict[str, Any]:
    """Train, save (`save_drafter`) and return the run summary (also in out/train_log.json).

    `data_dir`: one gen-data folder or several (their sequences are pooled). `cache_states`:
    run the frozen target once over the whole data set (`StateCache`) instead of every step."""
    from specserve.speculative.checkpoint import save_drafter

    out = Path(out)
    target, _ = load_model(target_dir, device=device)
    # The drafter trains and is saved in float32, whatever the target's files hold.
    target_config = _read_config(target_dir) | {"torch_dtype": "float32"}
    data = load_dataset(data_dir)
    ids_all, prompt_len = data["input_ids"].long(), int(data["prompt_len"])
    torch.manual_seed(train.seed)
    drafter = build_drafter(spec, target, target_config).to(device).train()
    t_cache = time.monotonic()
    cache = (
        StateCache(target, ids_all, capture_layers(drafter, spec.algorithm))
        if cache_states
        else None
    )
    t_cache = time.monotonic() - t_cache
    opt = make_optimizer(drafter.parameters(), train)
    ckpt = Checkpointer(out, train.checkpoint_minutes)
    start, log, elapsed = 0, [], 0.0
    if resume and ckpt.exists():
        state = ckpt.load()
        drafter.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        start, log, elapsed = state["step"], state["log"], state["elapsed"]
    n = len(ids_all)
    bar = Progress(train.steps, start, spec.algorithm)
    t0 = time.monotonic()
    for step in range(start, train.steps):
        idx = _batch_indices(step, train.batch_size, n, train.seed)
        batch = ids_all[idx].to(device)
        gen = torch.Generator().manual_seed(train.seed * 1_000_003 + step)
        for g in opt.param_groups:
            g["lr"] = train.lr_at(step)
        states = cache.batch(idx, device) if cache is not None else None
        parts = step_loss(drafter, target, batch, prompt_len, spec, gen, states)
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), train.grad_clip)
        opt.step()
        bar.update(batch.numel(), loss=parts.total.item(), acc=parts.accept.item())
        if step % 10 == 0 or step + 1 == train.steps:
            log.append(
                {
                    "step": step,
                    **{
                        k: round(getattr(parts, k).item(), 4)
                        for k in ("total", "ce", "tv", "bce", "accept")
                    },
                }
            )
        done = step + 1 == train.steps
        state = {
            "model": trainable(drafter),
            "optimizer": opt.state_dict(),
            "step": step + 1,
            "log": log,
            "elapsed": elapsed + time.monotonic() - t0,
        }
        ckpt.maybe_save(state, force=done)
    bar.close()
    elapsed += time.monotonic() - t0
    save_drafter(drafter, out)
    summary = {
        "algorithm": spec.algorithm,
        "params": sum(v.numel() for v in trainable(drafter).values()),
        "train_seconds": round(elapsed, 1),
        "state_cache_seconds": round(t_cache, 1),  # the one-time target pass of this run
        "spec": spec,
        "train": train,
        "log": log,
    }
    write_json(out / "train_log.json", summary)
    return summary


def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Rows of step `step`: a fresh permutation of the data set every epoch."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
    return perm[i * batch_size : (i + 1) * batch_size]


def _read_config(path: str | Path) -> dict[str, Any]:
    import json

    return json.loads((Path(path) / "config.json").read_text())
