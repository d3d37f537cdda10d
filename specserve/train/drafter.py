"""Train an MTP, DFlash or DSpark drafter against a frozen target (the DeepSpec recipe).

Per step: B target-generated sequences; one no-grad target forward gives the hidden states of
`target_layer_ids` (the drafter's context) and the target's distribution at every position
(the TV / confidence labels), or a `TargetStateCache` on disk holds them. DFlash and DSpark
then draft A random anchor blocks per sequence in one packed forward (block-sparse mask, see
`speculative/dflash.py`); MTP runs its module over every position, chained `mtp_depth` times.
The embedding and LM head are the target's, frozen. The step loop itself (data parallel under
torchrun, accumulation, clipping, checkpoints, logs) is `loop.fit`.
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
from specserve.train.loop import LossFn, TrainConfig, fit, trainable, write_json
from specserve.train.losses import DFLASH_WEIGHTS, DSPARK_WEIGHTS, LossParts, draft_loss
from specserve.train.parallel import World
from specserve.train.state_cache import INDEX_NAME, CacheKey, TargetStateCache, write_cache

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
    # Loss weights (DeepSpec's names); None: the algorithm's default (`losses.py`).
    ce_loss_alpha: float | None = None
    l1_loss_alpha: float | None = None
    confidence_head_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}")

    def loss_weights(self) -> dict[str, float]:
        base = DSPARK_WEIGHTS if self.algorithm == "dspark" else DFLASH_WEIGHTS
        given = {
            "ce": self.ce_loss_alpha,
            "tv": self.l1_loss_alpha,
            "bce": self.confidence_head_alpha,
        }
        return base | {k: v for k, v in given.items() if v is not None}


def default_layer_ids(num_target_layers: int, count: int = 3) -> tuple[int, ...]:
    """`count` layers evenly spaced from layer 1 to about 94% of the depth: DFlash's choice for
    Qwen3-8B ([1, 9, 17, 25, 33] of 36 layers) scaled to the target, and never the last layer
    (8 layers -> [1, 4, 6]): Hugging Face reports that one after the final norm, and llama.cpp's
    DSpark has no layer input behind it (it aborts at run time), as in DeepSpec's and z-lab's
    drafters."""
    last = num_target_layers - 1
    lo, hi = min(1, last), max(0, min(last - 1, last - round(last * 2 / 35)))
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


def block_loss(
    drafter,
    target,
    input_ids: torch.Tensor,
    prompt_len: int,
    spec: DrafterSpec,
    generator: torch.Generator,
    states: tuple[torch.Tensor, torch.Tensor] | None = None,
    lengths: torch.Tensor | None = None,
) -> LossParts:
    """DFlash / DSpark loss of one batch [B, T] of sequences (`states`: the batch's
    `target_states`, when cached; `prompt_len` and `lengths` may be per row [B], the rows
    right-padded to T)."""
    b, t = input_ids.shape
    k = drafter.block_size
    feats, last = states or target_states(target, input_ids, drafter.config.target_layer_ids)
    ends = torch.full((b,), t) if lengths is None else lengths.cpu()
    anchors, amask = sample_anchors(b, ends, prompt_len, spec.anchors_per_seq, generator)
    anchors, amask = anchors.to(input_ids.device), amask.to(input_ids.device)
    out = drafter(input_ids, feats, anchors, amask)
    slots = torch.arange(k, device=anchors.device)
    valid = out.valid & (anchors[:, :, None] + 1 + slots < ends.to(anchors.device)[:, None, None])
    # The target's distribution of the token at anchor + k + 1 is its output at anchor + k.
    rows = (anchors[:, :, None] + slots).clamp(max=t - 1)
    with torch.no_grad():
        h = last.gather(1, rows.reshape(b, -1, 1).expand(-1, -1, last.shape[-1]))
        t_logits = target.compute_logits(h.reshape(-1, h.shape[-1])).view(*rows.shape, -1)
    conf = getattr(out, "confidence_logits", None)
    return draft_loss(
        out.logits,
        t_logits,
        out.target_ids,
        valid,
        conf,
        spec.loss_weights(),
        spec.loss_decay_gamma,
    )


def mtp_loss(
    mtp,
    target,
    input_ids: torch.Tensor,
    prompt_len: int,
    depth: int,
    states: tuple[torch.Tensor, torch.Tensor] | None = None,
    weights: dict[str, float] = DFLASH_WEIGHTS,
    lengths: torch.Tensor | None = None,
) -> LossParts:
    """MTP loss, chained `depth` steps (as `MTPModule.forward` chains); step d (1-based)
    predicts the token d + 1 ahead, weighted like block slot d. Only target-generated labels
    (position >= prompt_len) count, so only their rows go through the LM head. Depth 1 is
    DeepSeek-V3's recipe (one module trained one token ahead, chained only at inference).
    `prompt_len` and `lengths` may be per row [B] (rows right-padded to T)."""
    b, t = input_ids.shape
    firsts = torch.as_tensor(prompt_len, device=input_ids.device).expand(b)
    ends = torch.full((b,), t) if lengths is None else lengths
    p0 = max(int(firsts.min()), 2)
    label_pos = torch.arange(p0, t, device=input_ids.device)
    valid = (label_pos >= firsts[:, None]) & (label_pos < ends.to(input_ids.device)[:, None])
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
        parts.append(
            draft_loss(
                logits[:, :, None],
                t_logits[:, :, None],
                labels[..., None],
                valid[..., None],
                None,
                weights,
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


def step_loss(
    drafter, target, batch, prompt_len, spec, generator, states=None, lengths=None
) -> LossParts:
    if spec.algorithm == "mtp":
        return mtp_loss(
            drafter, target, batch, prompt_len, spec.mtp_depth, states, spec.loss_weights(), lengths
        )
    return block_loss(drafter, target, batch, prompt_len, spec, generator, states, lengths)


# -- the run -----------------------------------------------------------------------------------
def train_drafter(
    spec: DrafterSpec,
    target_dir: str | Path,
    data_dir: str | Path | list[str | Path],
    out: str | Path,
    train: TrainConfig,
    resume: bool = False,
    device: str = "cpu",
    cache_states: bool = False,
    target_cache: str | Path | None = None,
    cache_dtype: str = "bfloat16",
    world: World = World(),
) -> dict[str, Any]:
    """Train, save (`save_drafter`) and return the run summary (also in out/train_log.json).

    `data_dir`: one gen-data folder or several (their sequences are pooled). `target_cache`: read
    the target's states from this cache (`specserve train cache-target`) instead of running the
    target every step; `cache_states`: first write one to out/target_cache (kept for --resume).
    Under torchrun (`world`) every rank runs its share of each global batch; rank 0 saves."""
    from specserve.speculative.checkpoint import save_drafter

    out = Path(out)
    target, _ = load_model(target_dir, device=device)
    # The drafter trains and is saved in float32, whatever the target's files hold.
    target_config = _read_config(target_dir) | {"torch_dtype": "float32"}
    data = load_dataset(data_dir, pad=True)
    ids_all, prompt_lens, lengths = data["input_ids"].long(), data["prompt_lens"], data["lengths"]
    torch.manual_seed(train.seed)
    drafter = build_drafter(spec, target, target_config).to(device).train()
    t_cache = time.monotonic()
    if cache_states and target_cache is None:
        target_cache = out / "target_cache"
    cache = None
    if target_cache is not None:
        key = CacheKey.of(
            target_dir,
            ids_all,
            capture_layers(drafter, spec.algorithm),
            target_config["hidden_size"],
        )
        if cache_states and not (Path(target_cache) / INDEX_NAME).exists():
            write_cache(target, key, ids_all, target_cache, world, cache_dtype, lengths=lengths)
        cache = TargetStateCache(target_cache)
        cache.check(key, ignore=("target_layer_ids",) if spec.algorithm == "mtp" else ())
    t_cache = time.monotonic() - t_cache

    log, elapsed = fit(
        drafter,
        _loss_fn(drafter, target, spec, ids_all, prompt_lens, lengths, cache, device),
        lambda step: _batch_indices(step, train.batch_size, lengths, train.seed),
        train,
        out,
        world,
        resume,
        device,
        spec.algorithm,
        ids_all.shape[1],
    )
    summary = {
        "algorithm": spec.algorithm,
        "params": sum(v.numel() for v in trainable(drafter).values()),
        "train_seconds": round(elapsed, 1),
        "state_cache_seconds": round(t_cache, 1),  # writing / opening the target-state cache
        "processes": world.size,
        "spec": spec,
        "train": train,
        "log": log,
    }
    if world.main:
        save_drafter(drafter, out)
        write_json(out / "train_log.json", summary)
    return summary


def _loss_fn(
    drafter: torch.nn.Module,
    target: torch.nn.Module,
    spec: DrafterSpec,
    ids: torch.Tensor,
    prompt_lens: torch.Tensor,
    lengths: torch.Tensor,
    cache: TargetStateCache | None,
    device: str,
) -> LossFn:
    """`fit`'s loss: the loss of the rows `idx` and its parts to log."""

    def loss_fn(idx: torch.Tensor, gen: torch.Generator):
        t = int(lengths[idx].max())  # rows of shorter prompts are right-padded: cut the padding
        states = cache.batch(idx, device) if cache is not None else None
        states = states and tuple(s[:, :t] for s in states)
        batch = ids[idx, :t].to(device)
        parts = step_loss(
            drafter, target, batch, prompt_lens[idx], spec, gen, states, lengths[idx].to(device)
        )
        return parts.total, {k: getattr(parts, k) for k in ("total", "ce", "tv", "bce", "accept")}

    return loss_fn


def _batch_indices(step: int, batch_size: int, lengths: torch.Tensor, seed: int) -> torch.Tensor:
    """Rows of step `step`: every epoch a fresh permutation of the data set, grouped by length
    (rows of one prompt length share a batch, so little padding runs), batches in random order."""
    n = len(lengths)
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed + 7919 * epoch)
    perm = torch.randperm(n, generator=gen)
    perm = perm[lengths[perm].argsort(stable=True)]
    batches = perm[: per_epoch * min(batch_size, n)].view(per_epoch, -1)
    return batches[torch.randperm(per_epoch, generator=gen)[i]]


def _read_config(path: str | Path) -> dict[str, Any]:
    import json

    return json.loads((Path(path) / "config.json").read_text())
