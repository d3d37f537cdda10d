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
`lm_head` are the target's (`share_target` with a `TargetHandle`) unless a checkpoint carries
its own.

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

Drafting (serving and offline evaluation alike): `draft_hidden` (or `run_blocks`) gives the
block's hidden states, `draft` picks the K tokens left to right with a pick function (argmax or
a sample), `block_confidence_logits` scores them (DSpark). The engine's drafter
(`block_drafter.py`) keeps per request the projected context K/V of every committed position,
grown by `context_kv` as `Drafter.update` delivers hidden states.

The config lives in `draft_config.py`, the draft layer in `draft_layers.py`, the masks in
`draft_masks.py`, the per-request context in `context_cache.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from specserve.models.layers import Linear, RMSNorm, RotaryEmbedding
from specserve.speculative.context_cache import pad_stack
from specserve.speculative.draft_config import DraftConfig
from specserve.speculative.draft_layers import DraftLayer
from specserve.speculative.draft_masks import draft_mask, safe_anchors, training_mask
from specserve.speculative.handle import TargetHandle
from specserve.speculative.sampling import Pick


@dataclass
class DFlashOutput:
    hidden: torch.Tensor  # [B, A, K, H]
    logits: torch.Tensor  # [B, A, K, V]
    target_ids: torch.Tensor  # [B, A, K]
    valid: torch.Tensor  # [B, A, K] bool


class BlockDrafting:
    """The one left-to-right drafting loop of the block drafters (serving and offline evaluation
    alike). A model provides `compute_logits` (hidden [..., H] -> base logits [..., V]); DSpark
    models override `markov_step` and `confidence_logits`."""

    compute_logits: Callable[[Tensor], Tensor]

    def markov_step(
        self,
        base: torch.Tensor,
        prev: torch.Tensor,
        hidden: torch.Tensor,
        state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of one slot from its backbone logits base [..., V], the token picked at the slot
        before, prev [...], and the slot's hidden [..., H]. DFlash: base itself (DSpark adds
        the Markov bias)."""
        return base, state

    def confidence_logits(self, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor | None:
        """hidden [..., H], prev [...] token before each slot -> logits [...]; None: no head."""
        return None

    def draft(self, hidden: torch.Tensor, anchor: torch.Tensor, pick: Pick) -> tuple[Tensor, ...]:
        """Pick a block's tokens left to right: hidden [..., K, H] (`draft_hidden`, `run_blocks`),
        anchor [...] the token before slot 0 -> pick's outputs per slot stacked on a slot axis
        (tokens [..., K] first). Slot k reads the token picked at slot k - 1 (`markov_step`)."""
        base = self.compute_logits(hidden)
        prev, state, steps = anchor, None, []
        for k in range(hidden.shape[-2]):
            logits, state = self.markov_step(base[..., k, :], prev, hidden[..., k, :], state)
            steps.append(pick(logits))
            prev = steps[-1][0]
        return tuple(torch.stack(x, dim=anchor.dim()) for x in zip(*steps, strict=True))

    def block_confidence_logits(
        self, hidden: torch.Tensor, anchor: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor | None:
        """Confidence logits [..., K] of a drafted block (tokens [..., K]); None: no head."""
        prev = torch.cat([anchor[..., None], tokens[..., :-1]], dim=-1)
        return self.confidence_logits(hidden, prev)


class DFlashDraftModel(BlockDrafting, nn.Module):
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
        #: target layers whose hidden states feed `context_kv`
        self.capture_layers = cfg.target_layer_ids

    context_rows: int | None = None  # every committed position's context is read

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def context_dtype(self) -> torch.dtype:
        """The dtype `context_kv` takes target hidden states in."""
        return self.fc.weight.dtype

    #: submodules that are the target's own (not saved with the drafter by default)
    SHARED = ("embed_tokens", "lm_head")

    def share_target(self, target: TargetHandle, names: tuple[str, ...] = SHARED) -> None:
        """Use the target's embedding and LM head, frozen, as the reference does (`names`: the
        parts this drafter has no own copy of); check the context layers against the target."""
        self.capture_layers = target.capture(self.config.target_layer_ids)
        for name in names:
            setattr(self, name, getattr(target, name))

    # -- pieces shared by training and inference --------------------------------------------
    def context_kv(
        self, target_hidden: torch.Tensor, positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """target_hidden [..., n*H], positions [...] -> per layer (k, v) [..., kv, d]."""
        feats = self.hidden_norm(self.fc(target_hidden))
        layers = [cast(DraftLayer, layer) for layer in self.layers]
        return [layer.self_attn.project_kv(feats, positions, self.rotary) for layer in layers]

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

    def forward(
        self,
        input_ids: Tensor,
        target_hidden: Tensor,
        anchors: Tensor,
        anchor_mask: Tensor | None = None,
    ) -> DFlashOutput:
        hidden, target_ids, valid = self.run_blocks(input_ids, target_hidden, anchors, anchor_mask)
        return DFlashOutput(hidden, self.compute_logits(hidden), target_ids, valid)

    # -- inference -----------------------------------------------------------------------------
    def draft_hidden(
        self,
        anchor_tokens: torch.Tensor,
        anchor_positions: torch.Tensor,
        contexts: list[list[tuple[torch.Tensor, ...]]],
        k: int,
    ) -> torch.Tensor:
        """One block per request: anchor_tokens, anchor_positions [R]; contexts[r] per layer
        (k, v) [L_r, kv, d] of request r's committed positions -> hidden [R, k, H]."""
        dev = anchor_tokens.device
        lens = torch.tensor([c[0][0].shape[0] if c else 0 for c in contexts], device=dev)
        ctx = [pad_stack([c[i] for c in contexts]) for i in range(len(self.layers))]
        mask = draft_mask(lens, ctx[0][0].shape[1] if ctx else 0, k)
        x = self.block_embeddings(anchor_tokens, k)
        positions = anchor_positions[:, None] + torch.arange(k, device=dev)
        # A request near the end of the context keeps fewer than k slots (the scheduler gives it
        # no room past its last token); its extra slots, discarded, stay inside the RoPE table.
        positions = positions.clamp(max=self.rotary.cos.shape[0] - 1)
        return self.backbone(x, positions, ctx, mask)
