"""The greedy draft step of the block drafters in one C++ call (`torch.ops.specserve.draft_block`,
`specserve/kernels/draft_step.cpp`): block embeddings, every draft layer over each request's
context rows in place, the LM head, the left-to-right argmax with the vanilla Markov bias and
the confidence logits, for all requests at once. The PyTorch path spends ~150 small ops on the
same step. It gives the same tokens (the products are the same tiled sums) and the same
confidence logits to float32 rounding. `context_kv` (`draft_context`) projects a round's newly
committed target hidden states into the draft layers' context rows, for sampled requests too
(rows equal to float32 rounding; a sampled draft reports its q exactly either way).

`FusedDraft.of(model)` gathers the weights when the drafter fits: its products tiled
(`--attention-backend cpp`, float32 on the CPU), dense MLPs without biases, a vanilla Markov head
or none. All-greedy batches use the whole step (`DFlashDrafter.propose`); a batch with sampled
requests takes only the block's hidden rows from C++ (`hidden`, `draft_hidden`: the draft
layers over the contexts in place, no padding) and picks in PyTorch, which reports the draft
distributions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from specserve.models.layers import GatedMLP, Linear
from specserve.speculative.dflash import DFlashDraftModel
from specserve.speculative.draft_layers import DraftLayer
from specserve.speculative.dspark import DSparkDraftModel

NONE = torch.empty(0)  # an absent weight (no Markov head, no confidence head or bias)


@dataclass(frozen=True)
class FusedDraft:
    """The weights and sizes `draft_block` reads, gathered once per drafter."""

    weights: list[torch.Tensor]  # per draft layer: see `layer_weights`
    embed: torch.Tensor  # [V, H]
    fc: torch.Tensor  # tiled
    hidden_norm: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # tiled
    cos: torch.Tensor  # [positions, head_dim / 2]
    sin: torch.Tensor
    markov_w1: torch.Tensor  # [V, rank] or NONE
    markov_w2: torch.Tensor  # tiled or NONE
    conf_w: torch.Tensor  # tiled [1, H (+ rank), 64] or NONE
    conf_b: torch.Tensor  # [1] or NONE
    mask_token: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    eps: float

    @property
    def has_confidence_head(self) -> bool:
        return self.conf_w.numel() > 0

    @classmethod
    def of(cls, model: nn.Module) -> FusedDraft | None:
        """The fused step's weights of `model`, or None where it does not fit (see module doc)."""
        if not isinstance(model, DFlashDraftModel) or not _fits(model):
            return None
        m = model.config.model
        markov = getattr(model, "markov_head", None)
        conf = getattr(model, "confidence_head", None)
        return cls(
            weights=[w for layer in model.layers for w in layer_weights(cast(DraftLayer, layer))],
            embed=model.embed_tokens.weight.detach().contiguous(),  # a no-op unless a view
            fc=_tiled(model.fc),
            hidden_norm=model.hidden_norm.weight.detach(),
            final_norm=model.norm.weight.detach(),
            lm_head=_tiled(model.lm_head),
            cos=model.rotary.cos,
            sin=model.rotary.sin,
            markov_w1=NONE if markov is None else markov.markov_w1.weight.detach().contiguous(),
            markov_w2=NONE if markov is None else _tiled(markov.markov_w2),
            conf_w=NONE if conf is None else _tiled(conf.proj),
            conf_b=NONE if conf is None or conf.proj.bias is None else conf.proj.bias.detach(),
            mask_token=model.config.mask_token_id,
            num_heads=m.num_attention_heads,
            num_kv_heads=m.num_key_value_heads,
            intermediate=m.intermediate_size,
            eps=m.rms_norm_eps,
        )

    def __call__(
        self,
        anchor: torch.Tensor,
        anchor_positions: torch.Tensor,
        contexts: list[list[tuple[torch.Tensor, ...]]],
        k: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """anchor, anchor_positions [R]; contexts[r] per layer (k, v) [L_r, kv, d] (as
        `DFlashDraftModel.draft_hidden`) -> (tokens [R, k] int64, confidence [R, k]): the
        confidence head's logits when the drafter has one, else max_v q_k(v) (`draw`'s proxy)."""
        ctx = [t for layers in contexts for layer in layers for t in layer]
        tokens, conf_logits, top = torch.ops.specserve.draft_block(
            anchor,
            anchor_positions,
            ctx,
            self.weights,
            self.embed,
            self.final_norm,
            self.lm_head,
            self.cos,
            self.sin,
            self.markov_w1,
            self.markov_w2,
            self.conf_w,
            self.conf_b,
            k,
            self.mask_token,
            self.num_heads,
            self.num_kv_heads,
            self.intermediate,
            self.eps,
        )
        return tokens, conf_logits if self.has_confidence_head else top

    def hidden(
        self,
        anchor: torch.Tensor,
        anchor_positions: torch.Tensor,
        contexts: list[list[tuple[torch.Tensor, ...]]],
        k: int,
    ) -> torch.Tensor:
        """`DFlashDraftModel.draft_hidden` in one call (`draft_hidden`): the block's hidden rows
        [R, k, H] for the picks that stay in PyTorch (sampling, which reports q)."""
        ctx = [t for layers in contexts for layer in layers for t in layer]
        return torch.ops.specserve.draft_hidden(
            anchor,
            anchor_positions,
            ctx,
            self.weights,
            self.embed,
            self.final_norm,
            self.cos,
            self.sin,
            k,
            self.mask_token,
            self.num_heads,
            self.num_kv_heads,
            self.intermediate,
            self.eps,
        )

    def context_kv(
        self, target_hidden: torch.Tensor, positions: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`DFlashDraftModel.context_kv` in one call (`draft_context`): target_hidden [N, n*H],
        positions [N] -> per layer (k, v) [N, kv, d]."""
        kv = torch.ops.specserve.draft_context(
            target_hidden.contiguous(),
            positions,
            self.weights,
            self.fc,
            self.hidden_norm,
            self.cos,
            self.sin,
            self.num_kv_heads,
            self.eps,
        )
        return list(zip(kv[::2], kv[1::2], strict=True))


def _tiled(linear: nn.Module) -> torch.Tensor:
    """The tiled copy of a product's weight (`tile_for_kernels`; `_fits` checked it is there)."""
    return cast(torch.Tensor, linear.weight.tiled)  # type: ignore[union-attr]


def layer_weights(layer: DraftLayer) -> list[torch.Tensor]:
    """in_norm, q, k, v, q_norm, k_norm, o, post_norm, gate, up, down (`kDraftPerLayer`)."""
    attn, mlp = layer.self_attn, cast(GatedMLP, layer.mlp)
    return [
        layer.input_layernorm.weight.detach(),
        _tiled(attn.q_proj),
        _tiled(attn.k_proj),
        _tiled(attn.v_proj),
        attn.q_norm.weight.detach(),
        attn.k_norm.weight.detach(),
        _tiled(attn.o_proj),
        layer.post_attention_layernorm.weight.detach(),
        _tiled(mlp.gate_proj),
        _tiled(mlp.up_proj),
        _tiled(mlp.down_proj),
    ]


def _fits(model: DFlashDraftModel) -> bool:
    """Every product tiled, float32, no biases, dense MLPs, a vanilla Markov head or none."""
    linears: list[Linear] = [model.lm_head, model.fc]
    for layer in model.layers:
        attn, mlp = cast(DraftLayer, layer).self_attn, cast(DraftLayer, layer).mlp
        if type(mlp) is not GatedMLP:
            return False
        linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if any(type(lin) is not Linear or lin.bias is not None for lin in linears):
        return False
    if isinstance(model, DSparkDraftModel):
        if model.markov_head is not None:
            if model.markov_head.kind != "vanilla":
                return False
            linears.append(model.markov_head.markov_w2)
        if model.confidence_head is not None:
            linears.append(model.confidence_head.proj)
    tiled = all(hasattr(lin.weight, "tiled") for lin in linears)
    embed = model.embed_tokens
    return tiled and type(embed) is nn.Embedding and embed.weight.dtype == torch.float32
