"""DFlash: a block-parallel drafter conditioned on the target's hidden states.

The drafter sees the target's hidden states at `target_layer_ids` (concatenated, projected by
`fc` and normalised by `hidden_norm` into one *context feature* per committed position). Each
draft layer projects the context features with its own `k_proj` / `v_proj` (+ `k_norm`, rotary
at the context positions) and prepends them to the block's keys and values. A block is
`[anchor, mask x (K-1)]` at positions `anchor_pos .. anchor_pos + K - 1`; slot k predicts the
token at `anchor_pos + k + 1`, so one forward gives K draft tokens. Block slots attend to each
other bidirectionally and to the context features of positions *strictly before* the anchor
(the anchor is the token just sampled by the target, so its own hidden state does not exist
yet at draft time; the anchor enters through its embedding in slot 0). The embedding and LM
head are the target's (frozen, shared).

Weight names follow the DeepSpec checkpoint layout: `layers.{i}.self_attn.{q,k,v,o}_proj`,
`layers.{i}.self_attn.{q,k}_norm`, `layers.{i}.mlp.{gate,up,down}_proj`,
`layers.{i}.{input,post_attention}_layernorm`, `norm`, `fc`, `hidden_norm`; `embed_tokens` and
`lm_head` are shared with the target (`share_target`) unless a checkpoint carries its own.

Training API (`DFlashDraftModel.forward`)::

    out = model(input_ids, target_hidden, anchors, anchor_mask)
    # input_ids      [B, T] long   the sequences (prompt + target-generated continuation)
    # target_hidden  [B, T, n*H]   target hidden states at target_layer_ids for every position
    #                              (CausalLM.forward(..., capture=cfg.target_layer_ids).captured)
    # anchors        [B, A] long   anchor positions, A blocks per sequence packed in one forward
    # anchor_mask    [B, A] bool   False marks padding anchors (None: all valid)
    out.hidden      [B, A, K, H]  final draft hidden state per block slot (after `norm`)
    out.logits      [B, A, K, V]  draft logits; slot k scores the token at anchor + k + 1
    out.target_ids  [B, A, K]     input_ids[anchor + k + 1] (0 where out of range)
    out.valid       [B, A, K]     label in range and anchor valid

Inference (the engine's `DFlashDrafter`) keeps per request the projected context K/V of every
committed position, grown by `context_kv` as `Drafter.update` delivers hidden states, and runs
`draft_hidden` over `[anchor, mask x (K-1)]` for all requests at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specserve.config import ConfigError, ModelConfig
from specserve.core import Request
from specserve.models.layers import Linear, RMSNorm, RotaryEmbedding
from specserve.models.qwen3_moe import make_mlp
from specserve.speculative.base import Drafter, DraftProposal
from specserve.speculative.sampling import draw, proposal_probs

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


@dataclass(frozen=True)
class DraftConfig:
    """A DFlash / DSpark drafter: the target's dimensions plus the drafter's own fields.

    `model` carries the transformer dimensions (the target's, with `num_hidden_layers` = draft
    layers). `raw` is the target config the drafter's config.json was built from.
    """

    model: ModelConfig
    target_layer_ids: tuple[int, ...]
    num_target_layers: int
    block_size: int
    mask_token_id: int
    architecture: str = "Qwen3DSparkModel"
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        n = self.num_target_layers
        ids = self.target_layer_ids
        if not ids:
            raise ConfigError("drafter config: target_layer_ids must not be empty")
        if any(not (i == -1 or 0 <= i < n) for i in ids) or list(ids) != sorted(set(ids)):
            raise ConfigError(
                f"drafter config: target_layer_ids {list(ids)} must be strictly increasing "
                f"ids in {{-1}} U [0, {n - 1}] (num_target_layers = {n})"
            )
        if self.block_size < 1:
            raise ConfigError("drafter config: block_size must be at least 1")
        if not 0 <= self.mask_token_id < self.model.vocab_size:
            raise ConfigError(
                f"drafter config: mask_token_id {self.mask_token_id} is outside the vocabulary "
                f"[0, {self.model.vocab_size})"
            )
        if self.markov_rank < 0:
            raise ConfigError("drafter config: markov_rank must be >= 0")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise ConfigError(
                f"drafter config: markov_head_type {self.markov_head_type!r} is not one of "
                f"{', '.join(MARKOV_HEAD_TYPES)}"
            )
        if self.confidence_head_with_markov and not (
            self.enable_confidence_head and self.markov_rank > 0
        ):
            raise ConfigError(
                "drafter config: confidence_head_with_markov needs enable_confidence_head and "
                "markov_rank > 0"
            )

    @classmethod
    def from_target(
        cls, target: dict[str, Any], num_hidden_layers: int, **fields_: Any
    ) -> DraftConfig:
        """A drafter for the target whose config.json is `target` (a dict)."""
        raw = {**target, "num_hidden_layers": num_hidden_layers}
        arch = fields_.get("architecture", cls.architecture)
        model = ModelConfig.from_dict({**raw, "architectures": [arch]})
        fields_.setdefault("num_target_layers", int(target["num_hidden_layers"]))
        fields_["target_layer_ids"] = tuple(int(i) for i in fields_["target_layer_ids"])
        return cls(model=replace(model, qk_norm=True), raw=raw, **fields_)

    def to_dict(self) -> dict[str, Any]:
        """The drafter's config.json (DeepSpec layout): target config + drafter fields."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_SAVED}
        own["target_layer_ids"] = list(self.target_layer_ids)
        arch = own.pop("architecture")
        return {
            **self.raw,
            **own,
            "architectures": [arch],
            "num_hidden_layers": self.model.num_hidden_layers,
            "tie_word_embeddings": False,
        }


_NOT_SAVED = ("model", "raw")


# -- layers ------------------------------------------------------------------------------------
class DraftAttention(nn.Module):
    """Attention whose keys are [projected context features; block tokens]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        self.q_proj = Linear(cfg.hidden_size, h * d, cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, kv * d, cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, kv * d, cfg.attention_bias)
        self.o_proj = Linear(h * d, cfg.hidden_size, cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def project_kv(
        self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., H], positions [...] -> k, v [..., kv, d] (k normalised and rotated)."""
        shape = x.shape[:-1]
        k = self.k_norm(self.k_proj(x).view(*shape, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        return rope(rotary, positions, k), v

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        ctx_k: torch.Tensor,
        ctx_v: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, Q, H], positions [B, Q], ctx_k/ctx_v [B, L, kv, d], mask [B, 1, Q, L + Q]."""
        b, q_len, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, q_len, self.num_heads, self.head_dim))
        q = rope(rotary, positions, q)
        k, v = self.project_kv(x, positions, rotary)
        k = torch.cat([ctx_k.to(k.dtype), k], dim=1)
        v = torch.cat([ctx_v.to(v.dtype), v], dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))


class DraftLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DraftAttention(cfg)
        self.mlp = make_mlp(cfg, layer_idx)  # MoE when the drafter's config says so
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, rotary, ctx_k, ctx_v, mask):
        h = self.self_attn(self.input_layernorm(x), positions, rotary, ctx_k, ctx_v, mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class DFlashOutput:
    hidden: torch.Tensor  # [B, A, K, H]
    logits: torch.Tensor  # [B, A, K, V]
    target_ids: torch.Tensor  # [B, A, K]
    valid: torch.Tensor  # [B, A, K] bool


class DFlashDraftModel(nn.Module):
    """The DFlash backbone (see the module docstring for the training API)."""

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__()
        m = cfg.model
        self.config = cfg
        self.block_size = cfg.block_size
        self.embed_tokens = nn.Embedding(m.vocab_size, m.hidden_size)
        self.layers = nn.ModuleList(DraftLayer(m, i) for i in range(m.num_hidden_layers))
        self.norm = RMSNorm(m.hidden_size, m.rms_norm_eps)
        self.fc = Linear(len(cfg.target_layer_ids) * m.hidden_size, m.hidden_size)
        self.hidden_norm = RMSNorm(m.hidden_size, m.rms_norm_eps)
        self.lm_head = Linear(m.hidden_size, m.vocab_size)
        self.rotary = RotaryEmbedding(
            m.head_dim, m.max_position_embeddings, m.rope_theta, m.rope_scaling
        )

    #: submodules that are the target's own (not saved with the drafter by default)
    SHARED = ("embed_tokens", "lm_head")

    def share_target(self, target: nn.Module) -> None:
        """Use the target's embedding and LM head (a `CausalLM`), frozen, as the reference does."""
        self.embed_tokens = target.model.embed_tokens
        self.lm_head = target.lm_head

    # -- pieces shared by training and inference --------------------------------------------
    def context_kv(
        self, target_hidden: torch.Tensor, positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """target_hidden [..., n*H], positions [...] -> per layer (k, v) [..., kv, d]."""
        feats = self.hidden_norm(self.fc(target_hidden))
        return [layer.self_attn.project_kv(feats, positions, self.rotary) for layer in self.layers]

    def block_embeddings(self, anchor_tokens: torch.Tensor, k: int) -> torch.Tensor:
        """anchor_tokens [...] -> embeddings [..., k, H] of [anchor, mask x (k-1)]."""
        ids = anchor_tokens.new_full((*anchor_tokens.shape, k), self.config.mask_token_id)
        ids[..., 0] = anchor_tokens
        return self.embed_tokens(ids)

    def backbone(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        ctx: list[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, Q, H] block embeddings, ctx per layer [B, L, kv, d] -> hidden [B, Q, H]."""
        for layer, (ck, cv) in zip(self.layers, ctx, strict=True):
            x = layer(x, positions, self.rotary, ck, cv, mask)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # -- training ------------------------------------------------------------------------------
    def run_blocks(
        self,
        input_ids: torch.Tensor,
        target_hidden: torch.Tensor,
        anchors: torch.Tensor,
        anchor_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The packed block forward: -> hidden [B, A, K, H], target_ids [B, A, K], valid."""
        b, t = input_ids.shape
        a, k = anchors.shape[1], self.block_size
        dev = input_ids.device
        anchors, anchor_mask = safe_anchors(anchors, anchor_mask, t)
        ctx_pos = torch.arange(t, device=dev).expand(b, t)
        ctx = self.context_kv(target_hidden, ctx_pos)
        x = self.block_embeddings(input_ids.gather(1, anchors), k).reshape(b, a * k, -1)
        offs = torch.arange(k, device=dev)
        positions = (anchors[:, :, None] + offs).reshape(b, a * k)
        mask = training_mask(anchors, t, k)
        hidden = self.backbone(x, positions, ctx, mask).view(b, a, k, -1)
        label_pos = anchors[:, :, None] + offs + 1  # [B, A, K]
        valid = (label_pos < t) & anchor_mask[:, :, None]
        target_ids = input_ids.gather(1, label_pos.clamp(max=t - 1).reshape(b, -1)).view(b, a, k)
        return hidden, torch.where(valid, target_ids, 0), valid

    def forward(self, input_ids, target_hidden, anchors, anchor_mask=None) -> DFlashOutput:
        hidden, target_ids, valid = self.run_blocks(input_ids, target_hidden, anchors, anchor_mask)
        return DFlashOutput(hidden, self.compute_logits(hidden), target_ids, valid)

    # -- inference -----------------------------------------------------------------------------
    def draft_hidden(
        self,
        anchor_tokens: torch.Tensor,
        anchor_positions: torch.Tensor,
        contexts: list[list[tuple[torch.Tensor, torch.Tensor]]],
        k: int,
    ) -> torch.Tensor:
        """One block per request: anchor_tokens, anchor_positions [R]; contexts[r] per layer
        (k, v) [L_r, kv, d] of request r's committed positions -> hidden [R, k, H]."""
        r = anchor_tokens.shape[0]
        dev = anchor_tokens.device
        lens = torch.tensor([c[0][0].shape[0] if c else 0 for c in contexts], device=dev)
        ctx = [
            _pad_stack([c[i] for c in contexts], self.config.model) for i in range(len(self.layers))
        ]
        lmax = ctx[0][0].shape[1] if ctx else 0
        ar = torch.arange(lmax + k, device=dev)
        mask = (ar[None, :] < lens[:, None]) | (ar[None, :] >= lmax)  # [R, L + k]
        mask = mask[:, None, None, :].expand(r, 1, k, lmax + k)
        x = self.block_embeddings(anchor_tokens, k)
        positions = anchor_positions[:, None] + torch.arange(k, device=dev)
        return self.backbone(x, positions, ctx, mask)


def safe_anchors(
    anchors: torch.Tensor, anchor_mask: torch.Tensor | None, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding anchors (mask False) become 0; all anchors clamped into [0, seq_len)."""
    if anchor_mask is None:
        anchor_mask = torch.ones_like(anchors, dtype=torch.bool)
    return torch.where(anchor_mask, anchors, 0).clamp(0, seq_len - 1), anchor_mask


def rope(rotary: RotaryEmbedding, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., heads, d] by positions [...] (neox style, as `RotaryEmbedding`)."""
    cos = rotary.cos[positions].unsqueeze(-2)
    sin = rotary.sin[positions].unsqueeze(-2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def training_mask(anchors: torch.Tensor, seq_len: int, k: int) -> torch.Tensor:
    """Block-sparse mask [B, 1, A*K, T + A*K]: block a sees context < anchors[b, a] and itself."""
    b, a = anchors.shape
    dev = anchors.device
    q_block = torch.arange(a * k, device=dev) // k  # [Q]
    anchor_of_q = anchors[:, q_block]  # [B, Q]
    ctx = torch.arange(seq_len, device=dev)[None, None, :] < anchor_of_q[:, :, None]
    kv_block = torch.arange(a * k, device=dev) // k
    own = (q_block[:, None] == kv_block[None, :]).expand(b, -1, -1)
    return torch.cat([ctx, own], dim=2).unsqueeze(1)


def _pad_stack(kvs: list[tuple[torch.Tensor, torch.Tensor]], m: ModelConfig):
    """Per request (k, v) [L_r, kv, d] -> (k, v) [R, Lmax, kv, d], zero padded."""
    lmax = max((k.shape[0] for k, _ in kvs), default=0)
    ref = kvs[0][0]
    out_k = ref.new_zeros(len(kvs), lmax, m.num_key_value_heads, m.head_dim)
    out_v = ref.new_zeros(len(kvs), lmax, m.num_key_value_heads, m.head_dim)
    for i, (k, v) in enumerate(kvs):
        out_k[i, : k.shape[0]] = k
        out_v[i, : v.shape[0]] = v
    return out_k, out_v


# -- the engine's drafter ------------------------------------------------------------------------
class ContextCache:
    """One request's projected context K/V per draft layer, with the position of each row."""

    def __init__(self) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.positions = torch.zeros(0, dtype=torch.long)

    def add(self, kv: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor) -> None:
        """Append rows; rows at positions >= positions[0] are replaced (replay after preemption)."""
        if self.kv:
            keep = self.positions < positions[0]
            if not bool(keep.all()):
                self.kv = [(k[keep], v[keep]) for k, v in self.kv]
                self.positions = self.positions[keep]
            self.kv = [
                (torch.cat([k0, k1]), torch.cat([v0, v1]))
                for (k0, v0), (k1, v1) in zip(self.kv, kv, strict=True)
            ]
            self.positions = torch.cat([self.positions, positions.cpu()])
        else:
            self.kv, self.positions = kv, positions.cpu()


class DFlashDrafter(Drafter):
    """Drafts `block_size` tokens per step with one backbone forward over [anchor, mask...]."""

    def __init__(self, model: DFlashDraftModel, block_size: int | None = None) -> None:
        self.model = model
        self.block_size = block_size or model.config.block_size
        self.capture_layers = tuple(model.config.target_layer_ids)
        self.contexts: dict[str, ContextCache] = {}

    @property
    def max_draft_tokens(self) -> int:
        return self.block_size

    @torch.inference_mode()
    def update(self, requests: list[Request], hidden: list[torch.Tensor | None]) -> None:
        rows, pos, owners = [], [], []
        for req, h in zip(requests, hidden, strict=True):
            if h is None or h.shape[0] == 0 or req.finished:
                continue
            end = req.num_computed_tokens
            rows.append(h)
            pos.append(torch.arange(end - h.shape[0], end, device=h.device))
            owners.append((req.request_id, h.shape[0]))
        if not rows:
            return
        positions = torch.cat(pos)
        kv = self.model.context_kv(torch.cat(rows).to(self.model.fc.weight.dtype), positions)
        start = 0
        for rid, n in owners:
            part = [(k[start : start + n], v[start : start + n]) for k, v in kv]
            self.contexts.setdefault(rid, ContextCache()).add(part, positions[start : start + n])
            start += n

    def release(self, request: Request) -> None:
        self.contexts.pop(request.request_id, None)

    @torch.inference_mode()
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[DraftProposal]:
        ks = [min(self.block_size, m) for m in max_tokens]
        live = [i for i, k in enumerate(ks) if k > 0 and requests[i].request_id in self.contexts]
        out = [DraftProposal([]) for _ in requests]
        if not live:
            return out
        reqs = [requests[i] for i in live]
        k = max(ks[i] for i in live)
        dev = self.model.fc.weight.device
        hidden = self.model.draft_hidden(
            torch.tensor([r.last_token_id for r in reqs], device=dev),
            torch.tensor([r.num_tokens - 1 for r in reqs], device=dev),
            [self.contexts[r.request_id].kv for r in reqs],
            k,
        )
        tokens, q, conf = self.sample_block(hidden, reqs)
        for j, i in enumerate(live):
            n = ks[i]
            out[i] = DraftProposal(
                tokens[j, :n].tolist(), proposal_probs(q[j, :n], reqs[j]), conf[j, :n]
            )
        return out

    def sample_block(self, hidden: torch.Tensor, reqs: list[Request]):
        """hidden [R, K, H] -> tokens [R, K], q [R, K, V], confidences [R, K]."""
        logits = self.model.compute_logits(hidden)
        steps = [draw(logits[:, k], reqs) for k in range(logits.shape[1])]
        return tuple(torch.stack(x, dim=1) for x in zip(*steps, strict=True))
