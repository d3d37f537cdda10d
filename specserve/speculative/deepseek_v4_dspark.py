"""DSpark for DeepSeek-V4: the drafter that DeepSeek-V4-Flash-DSpark ships as `mtp.{i}.*`.

Built as SGLang's `deepseek_v4_dspark.py` and vLLM's `deepseek_v4/nvidia/dspark.py` build it:

* Context. The target's residual streams after each layer of `dspark_target_layer_ids`, averaged
  over the `hc_mult` streams (vLLM's `hidden_states.mean(dim=1)`), concatenated [n * H], then
  main_x = `main_norm(main_proj(.))` (stage 0's weights). Each stage turns main_x into window
  K (= V) with its own `attn.wkv`, `attn.norm` and the `main` RoPE at the context positions;
  these rows are what the stage attends to besides the block (SGLang's `write_target_hidden_kv`).
* Block. `[anchor, noise x (K-1)]` at positions p .. p+K-1 (p = the anchor's position) embedded
  by the target's embedding, copied onto the `hc_mult` streams, through the stages: each a
  DeepSeek-V4 block (window-only attention with sinks, MoE, hyper-connections), whose attention
  reads the context rows within the sliding window (q - k < `sliding_window`, k < p) and every
  block row, non-causally. The last stage's `hc_head_*` collapses the streams into x [K, H];
  slot k's base logits are the target's head on `norm(x)` and score the token at p + k + 1.
* Heads. The vanilla Markov head adds W2(W1[x_{k-1}]) (`markov_head.markov_w{1,2}`); the
  confidence head (`confidence_head.proj`, no bias) reads [x; W1[x_{k-1}]] (x before `norm`).

Checkpoint names: stage i's block is `mtp.{i}.{attn,ffn,attn_norm,ffn_norm,hc_attn_*,hc_ffn_*}`,
`main_proj` / `main_norm` are `mtp.0.*`, and `norm`, `hc_head_*`, `markov_head.*`,
`confidence_head.*` are `mtp.{last}.*` (vLLM's `_remap_dspark_name`). The embedding and head are
the target's. The number of stages is `len(dspark_target_layer_ids)`, as in SGLang.

Serving reuses `DFlashDrafter` (block_drafter.py): `context_kv` gives the per-request rows that
`ContextCache` keeps, the last `sliding_window - 1` (only committed positions ever enter it, so
a rejected draft leaves nothing to roll back; a replay after preemption replaces rows),
`draft_hidden` runs one block per request, and the drafting loop and confidence heads are
`DSparkHeads`'.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from specserve.config import ConfigError, read_config_json
from specserve.models.deepseek_v4 import (
    Attention,
    Block,
    DeepseekV4ForCausalLM,
    convert_official_formats,
    hyper_head,
)
from specserve.models.deepseek_v4_config import SLIDING, V4Config
from specserve.models.layers import Linear, RMSNorm
from specserve.models.loader import load_state_dict
from specserve.speculative.dspark import ConfidenceHead, DSparkHeads, MarkovHead

STAGE_PREFIX = "mtp."
# what a separate drafter folder's config must share with its target
FIT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "hc_mult",
    "head_dim",
    "num_attention_heads",
    "q_lora_rank",
    "o_lora_rank",
    "o_groups",
    "qk_rope_head_dim",
    "sliding_window",
    "n_routed_experts",
    "moe_intermediate_size",
)
_FIRST = ("main_proj.", "main_norm.")  # stage 0's; the other model-level names are the last's


@dataclass(frozen=True)
class V4DSparkConfig:
    """The `dspark_*` keys of a DeepSeek-V4 config.json."""

    block_size: int
    target_layer_ids: tuple[int, ...]
    noise_token_id: int
    markov_rank: int
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"dspark_block_size must be at least 1, got {self.block_size}")
        if not self.target_layer_ids:
            raise ConfigError("dspark_target_layer_ids must name at least one target layer")
        if self.markov_rank < 1:
            raise ConfigError(f"dspark_markov_rank must be at least 1, got {self.markov_rank}")

    @classmethod
    def from_raw(cls, raw: dict[str, Any], where: str) -> V4DSparkConfig:
        missing = [
            f"dspark_{k}"
            for k in ("block_size", "target_layer_ids", "noise_token_id", "markov_rank")
            if f"dspark_{k}" not in raw
        ]
        if missing:
            raise ConfigError(f"{where}: config.json has no {missing[0]} (no DSpark drafter)")
        return cls(
            block_size=int(raw["dspark_block_size"]),
            target_layer_ids=tuple(int(i) for i in raw["dspark_target_layer_ids"]),
            noise_token_id=int(raw["dspark_noise_token_id"]),
            markov_rank=int(raw["dspark_markov_rank"]),
            enable_confidence_head=bool(raw.get("enable_confidence_head", True)),
            confidence_head_with_markov=bool(raw.get("confidence_head_with_markov", True)),
        )


def has_dspark(path: str | Path) -> bool:
    """Whether the folder's config.json describes a DeepSeek-V4 DSpark drafter."""
    try:
        return "dspark_block_size" in read_config_json(path)
    except ConfigError:  # no or unreadable config.json: the target's loading reports it
        return False


@dataclass(frozen=True)
class _Context:
    """What a draft forward's attention reads besides the block: per request, per stage, the
    context rows (K = V [L, d] of the L positions before its anchor), and its rows in the
    block."""

    rows: list[list[torch.Tensor]]
    anchors: list[int]  # each request's rows are the positions just before its anchor
    spans: list[tuple[int, int]]


class DSparkAttention(Attention):
    """A stage's window attention: the block's queries over [context rows in the window; the
    whole block], non-causal inside the block."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, positions: torch.Tensor, ropes: dict, ctx: _Context, stage: int
    ) -> torch.Tensor:
        rope, cos, sin = ropes["main"]
        q = self.query(self.q_norm(self.wq_a(x)), rope, cos, sin)
        kv = self.key_value(x, rope, cos, sin)
        out = torch.empty_like(q)
        for rows, anchor, (a, b) in zip(ctx.rows, ctx.anchors, ctx.spans, strict=True):
            context = rows[stage]
            first = max(0, context.shape[0] - (self.window - 1))
            key_pos = anchor - context.shape[0] + torch.arange(first, context.shape[0])
            far = positions[a:b, None] - key_pos[None, :].to(x.device) >= self.window
            bias = torch.zeros(b - a, key_pos.shape[0] + b - a, device=x.device)
            bias[:, : key_pos.shape[0]].masked_fill_(far, float("-inf"))
            out[a:b] = self._attend(q[a:b], torch.cat([context[first:], kv[a:b]]), bias)
        return self.output(out, rope, cos, sin)


class DSparkStage(Block):
    attention = DSparkAttention


@dataclass(frozen=True)
class _Shared:
    """The target's parts the drafter uses (held outside the module tree, never saved)."""

    target: DeepseekV4ForCausalLM


class DeepseekV4DSparkModel(DSparkHeads, nn.Module):
    """The stages, `main_proj` / `main_norm`, the hyper head and `norm`, the Markov and
    confidence heads; drafting API as `DFlashDraftModel` (`context_kv`, `draft_hidden`, `draft`,
    `block_confidence_logits`)."""

    def __init__(self, v4: V4Config, cfg: V4DSparkConfig, target: DeepseekV4ForCausalLM) -> None:
        super().__init__()
        h, hc, eps = v4.hidden_size, v4.hc_mult, v4.rms_norm_eps
        self.config, self.block_size = cfg, cfg.block_size
        self.v4 = replace(v4, num_layers=1, layer_types=(SLIDING,), hash_layers=(False,))
        self.stages = nn.ModuleList(DSparkStage(self.v4, 0) for _ in cfg.target_layer_ids)
        self.main_proj = Linear(len(cfg.target_layer_ids) * h, h)
        self.main_norm = RMSNorm(h, eps)
        self.norm = RMSNorm(h, eps)
        self.hc_head_fn = nn.Parameter(torch.zeros(hc, hc * h))
        self.hc_head_base = nn.Parameter(torch.zeros(hc))
        self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.markov_head = MarkovHead("vanilla", v4.vocab_size, cfg.markov_rank, h)
        self.confidence_with_markov = cfg.confidence_head_with_markov
        extra = cfg.markov_rank if cfg.confidence_head_with_markov else 0
        self.confidence_head = (
            ConfidenceHead(h + extra, bias=False) if cfg.enable_confidence_head else None
        )
        self.capture_layers = cfg.target_layer_ids
        self.context_rows = v4.sliding_window - 1  # the most any block query reads
        self.shared = _Shared(target)

    @property
    def device(self) -> torch.device:
        return self.main_proj.weight.device

    @property
    def context_dtype(self) -> torch.dtype:
        return self.main_proj.weight.dtype

    # -- checkpoint names ----------------------------------------------------------------------
    def checkpoint_name(self, name: str) -> str:
        """Our parameter name -> the checkpoint's `mtp.{i}.*` name."""
        if name.startswith("stages."):
            return STAGE_PREFIX + name[len("stages.") :]
        stage = 0 if name.startswith(_FIRST) else len(self.stages) - 1
        return f"{STAGE_PREFIX}{stage}.{name}"

    # -- drafting ------------------------------------------------------------------------------
    def context_kv(self, target_hidden: torch.Tensor, positions: torch.Tensor) -> list[tuple]:
        """Captured streams [N, n * hc * H] at positions [N] -> per stage (K=V [N, d],)."""
        n, hc = target_hidden.shape[0], self.v4.hc_mult
        per_layer = target_hidden.view(n, len(self.capture_layers), hc, -1).mean(dim=2)
        main_x = self.main_norm(self.main_proj(per_layer.flatten(1)))
        rope, cos, sin = self.shared.target.bind_ropes(positions)["main"]
        attns = [cast(DSparkAttention, s.attn) for s in self.stages]
        return [(attn.key_value(main_x, rope, cos, sin),) for attn in attns]

    def draft_hidden(
        self,
        anchor_tokens: torch.Tensor,
        anchor_positions: torch.Tensor,
        contexts: list[list[tuple[torch.Tensor, ...]]],
        k: int,
    ) -> torch.Tensor:
        """One block per request: anchor_tokens, anchor_positions [R]; contexts[r] per stage
        (K=V [L_r, d],) of the L_r positions before the anchor -> x [R, k, H] (before `norm`)."""
        r = anchor_tokens.shape[0]
        ids = anchor_tokens.new_full((r, k), self.config.noise_token_id)
        ids[:, 0] = anchor_tokens
        ids = ids.flatten()
        positions = (anchor_positions[:, None] + torch.arange(k, device=ids.device)).flatten()
        spans = [(i * k, i * k + k) for i in range(r)]
        ctx = _Context([[t[0] for t in c] for c in contexts], anchor_positions.tolist(), spans)
        target = self.shared.target
        streams = target.embed(ids).unsqueeze(1).expand(-1, self.v4.hc_mult, -1)
        ropes = target.bind_ropes(positions)
        for i, stage in enumerate(self.stages):
            streams = stage(streams, ids, positions, ropes, ctx, i)
        head = (self.hc_head_fn, self.hc_head_base, self.hc_head_scale)
        return hyper_head(streams, *head, self.v4).view(r, k, -1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.shared.target.compute_logits(self.norm(hidden))


# -- loading ---------------------------------------------------------------------------------------


def load_v4_dspark(path: str | Path, target: DeepseekV4ForCausalLM) -> DeepseekV4DSparkModel:
    """The DSpark drafter of a DeepSeek-V4 folder (the target's own, or a separate one whose
    config must fit the target), in the target's dtype and device."""
    path = Path(path)
    raw = read_config_json(path, label="drafter ")
    cfg = V4DSparkConfig.from_raw(raw, str(path))
    check_fit(raw, target, cfg, path)
    model = DeepseekV4DSparkModel(target.v4, cfg, target)
    names = {model.checkpoint_name(n): n for n in model.state_dict()}
    state = load_state_dict(path, lambda k: k.startswith(STAGE_PREFIX))
    state = convert_official_formats(state, target.v4.fp8_block)
    if model.confidence_head is not None and not any(".confidence_head." in k for k in state):
        model.confidence_head = None  # as vLLM: a checkpoint without the head drafts without it
        names = {model.checkpoint_name(n): n for n in model.state_dict()}
    missing, unknown = sorted(names.keys() - state.keys()), sorted(state.keys() - names.keys())
    if missing or unknown:
        what = f"lacks {missing[0]}" if missing else f"has unknown {unknown[0]}"
        raise ConfigError(f"{path}: the DSpark drafter {what}")
    expected = model.state_dict()
    for key, tensor in state.items():
        if tensor.shape != expected[names[key]].shape:
            raise ConfigError(
                f"{path}: the DSpark drafter's {key} has shape {list(tensor.shape)}, its config "
                f"asks for {list(expected[names[key]].shape)}"
            )
    model.load_state_dict({names[k]: v for k, v in state.items()})
    ref = target.head.weight
    keep = {n: p.data for n, p in model.named_parameters() if n.endswith(target.float32_params)}
    model = model.to(device=ref.device, dtype=ref.dtype)
    for name, data in keep.items():  # float32 whatever the dtype, as in the target
        model.get_parameter(name).data = data.to(ref.device)
    return model.eval().requires_grad_(False)


def check_fit(
    raw: dict[str, Any], target: DeepseekV4ForCausalLM, cfg: V4DSparkConfig, path: Path
) -> None:
    """Refuse a drafter whose config differs from the target's (naming the field) or that reads
    target layers the target does not have."""
    mine = target.config.raw
    for field in FIT_FIELDS:
        if field in raw and field in mine and raw[field] != mine[field]:
            raise ConfigError(
                f"{path}: the DSpark drafter does not fit the target: {field} is {raw[field]}, "
                f"the target's is {mine[field]}"
            )
    n = target.v4.num_layers
    if any(not 0 <= i < n for i in cfg.target_layer_ids):
        raise ConfigError(
            f"{path}: the DSpark drafter does not fit the target: dspark_target_layer_ids "
            f"{list(cfg.target_layer_ids)} are not all in [0, {n - 1}]"
        )
    if not 0 <= cfg.noise_token_id < target.v4.vocab_size:
        raise ConfigError(
            f"{path}: the DSpark drafter does not fit the target: dspark_noise_token_id "
            f"{cfg.noise_token_id} is outside the vocabulary ({target.v4.vocab_size})"
        )
