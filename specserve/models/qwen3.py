"""The decoder-only transformer skeleton (Qwen3, Llama) on flattened variable-length batches.

Module names mirror the Hugging Face checkpoints (`model.layers.{i}.self_attn.q_proj`, ...), so
weights load by name. Dense and MoE models share everything but the MLP (`make_mlp`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specserve.config import ModelConfig
from specserve.models.attention import AttentionContext
from specserve.models.layers import (
    BoundRotary,
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    linear,
    tile_for_kernels,
    to_input_major,
)
from specserve.models.parallel import (
    Parallel,
    column_linear,
    embedding,
    gated_mlp,
    lm_head,
    row_linear,
)


@dataclass
class ModelOutput:
    hidden: torch.Tensor  # [N, H] after the final norm (what the LM head reads)
    captured: torch.Tensor | None  # [N, len(capture) * H] hidden states of the captured layers


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, par: Parallel | None = None) -> None:
        super().__init__()
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        tp, bias, hidden = (par.tp_size if par else 1), cfg.attention_bias, cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = h // tp, kv // tp, d  # this rank's
        self.q_proj = column_linear(hidden, h * d, bias, par)
        self.k_proj = column_linear(hidden, kv * d, bias, par)
        self.v_proj = column_linear(hidden, kv * d, bias, par)
        self.o_proj = row_linear(h * d, hidden, bias, par)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._qk_weight: torch.Tensor | None = None  # q_norm, k_norm weights per head (fused)

    def fuse(self) -> None:
        """Inference layout: q, k and v in one input-major block (one product), o too."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        weight = to_input_major(*(p.weight for p in projs))
        bias = torch.cat([p.bias for p in projs]).detach() if self.q_proj.bias is not None else None
        self._qkv = (weight, bias)
        to_input_major(self.o_proj.weight)
        if self.qk_norm:
            self._qk_weight = self._qk_norm_weight().detach()

    def forward(
        self,
        x: torch.Tensor,
        rotary: BoundRotary,
        ctx: AttentionContext,
        layer_idx: int,
    ) -> torch.Tensor:
        q, k, v = self.project(x, rotary)
        out = ctx.attend(layer_idx, q, k, v)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.head_dim))

    def project(
        self, x: torch.Tensor, rotary: BoundRotary
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] (normed) -> q [N, h, d], k, v [N, kv, d]: q/k norms and rotary applied."""
        n, h, kv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self._qkv is not None:
            qkv = linear(x, *self._qkv)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qk = qkv[:, : (h + kv) * d].view(n, h + kv, d)  # q and k heads side by side
        v = qkv[:, (h + kv) * d :].view(n, kv, d)
        if self.qk_norm:
            qk = self._qk_norm(qk)
        qk = rotary(qk)
        return qk[:, :h], qk[:, h:], v

    def _qk_norm_weight(self) -> torch.Tensor:
        """[h + kv, d]: q_norm's weight for each q head, then k_norm's for each k head."""
        q, k = self.q_norm.weight, self.k_norm.weight
        return torch.cat([q.expand(self.num_heads, -1), k.expand(self.num_kv_heads, -1)])

    def _qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        """q_norm on the q heads and k_norm on the k heads, in one normalisation."""
        weight = self._qk_norm_weight() if self._qk_weight is None else self._qk_weight
        if qk.dtype == torch.float32:
            return F.rms_norm(qk, (self.head_dim,), None, self.q_norm.eps) * weight
        normed = F.rms_norm(qk.float(), (self.head_dim,), None, self.q_norm.eps)
        return weight * normed.to(qk.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp: nn.Module, par: Parallel | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, par)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rotary, ctx, layer_idx):
        x = x + self.self_attn(self.input_layernorm(x), rotary, ctx, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, make_mlp, par: Parallel | None = None) -> None:
        super().__init__()
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, par)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, make_mlp(cfg, i, par), par) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )


def tile_products(module: nn.Module) -> None:
    """Tiled weights (`layers.tile_for_kernels`) for the products of `module` and its children:
    fused qkv and gate-up blocks, and every other `Linear`. The q/k/v and gate/up weights of a
    fused block are views of it and stay untiled, as do MoE experts (their gate-up block shares
    the experts' storage; a tiled copy would double the model)."""
    covered: set[int] = set()
    for m in module.modules():
        if isinstance(m, Attention) and m._qkv is not None:
            tile_for_kernels(m._qkv[0])
            covered |= {id(m.q_proj), id(m.k_proj), id(m.v_proj)}
        elif isinstance(m, GatedMLP) and m._fused is not None:
            covered |= {id(m.gate_proj), id(m.up_proj), id(m.down_proj)}
            if not m.shares_storage:  # not an MoE expert
                tile_for_kernels(m._fused)
                tile_for_kernels(m.down_proj.weight)
    for m in module.modules():
        if isinstance(m, Linear) and id(m) not in covered:
            tile_for_kernels(m.weight)


def dense_mlp(cfg: ModelConfig, layer_idx: int, par: Parallel | None = None) -> nn.Module:
    return gated_mlp(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, par)


class CausalLM(nn.Module):
    """A decoder-only LM. `forward` runs the N tokens of a flattened batch; `compute_logits`
    applies the LM head to chosen rows only (the engine never needs logits for every token).
    `par` (tensor / expert parallelism) makes this rank's shard; None is one process."""

    make_mlp = staticmethod(dense_mlp)

    def __init__(self, cfg: ModelConfig, par: Parallel | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, self.make_mlp, par)
        self.lm_head = lm_head(cfg.hidden_size, cfg.vocab_size, par)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._step_weights: list[torch.Tensor] | None = None  # set by `use_kernels`

    def kv_head_shape(self) -> tuple[int, int]:
        """(KV heads on this rank, head dim): one token's K (or V) in one layer's KV cache."""
        attn = self.model.layers[0].self_attn
        return attn.num_kv_heads, attn.head_dim

    def fuse(self) -> None:
        """Switch to the inference weight layout (see layers.to_input_major)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            if isinstance(layer.mlp, GatedMLP):
                layer.mlp.fuse()
        if not self.config.tie_word_embeddings:
            to_input_major(self.lm_head.weight)

    def use_kernels(self) -> bool:
        """After `fuse`, with the C++ kernels loaded (`--attention-backend cpp`): every product
        on tiled weights (`tile_products`), and, where the model fits it, every step (decode,
        verify windows, prefill chunks) through `torch.ops.specserve.dense_layers`, all decoder
        layers in one call.
        Returns whether that fused step is on; it needs float32 on the CPU, one process, no
        biases and a fused dense MLP in every layer."""
        tile_products(self)
        fits = self.config.num_attention_heads == self.model.layers[0].self_attn.num_heads
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            fits = fits and (
                attn._qkv is not None
                and hasattr(attn._qkv[0], "tiled")
                and attn._qkv[1] is None
                and type(attn.o_proj) is Linear
                and attn.o_proj.bias is None
                and type(mlp) is GatedMLP
                and mlp._fused is not None
                and hasattr(mlp._fused, "tiled")
                and mlp.down_proj.bias is None
            )
        self._step_weights = self._dense_step_weights() if fits else None
        return self._step_weights is not None

    def _dense_step_weights(self) -> list[torch.Tensor]:
        """`dense_layers`' weights: per layer input norm, qkv, q_norm, k_norm (empty without
        qk norm), o, post-attention norm, gate-up, down."""
        none = torch.empty(0)
        weights = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            weights += [
                layer.input_layernorm.weight.detach(),
                attn._qkv[0].tiled,
                attn.q_norm.weight.detach() if attn.qk_norm else none,
                attn.k_norm.weight.detach() if attn.qk_norm else none,
                attn.o_proj.weight.tiled,
                layer.post_attention_layernorm.weight.detach(),
                mlp._fused.tiled,
                mlp.down_proj.weight.tiled,
            ]
        return weights

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: AttentionContext,
        capture: tuple[int, ...] = (),
    ) -> ModelOutput:
        """input_ids, positions [N]. `capture` lists layer ids whose output hidden states to
        return (-1 = embedding output), numbered as Hugging Face's `hidden_states[i + 1]`."""
        x = self.model.embed_tokens(input_ids)
        step = getattr(ctx, "step_args", None) if self._step_weights is not None else None
        if step is not None:
            return self._dense_step(x, positions, step, capture)
        kept: dict[int, torch.Tensor] = {-1: x} if -1 in capture else {}
        last = len(self.model.layers) - 1
        rotary = self.model.rotary.bind(positions)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rotary, ctx, i)
            if i in capture and i != last:
                kept[i] = x
        x = self.model.norm(x)
        if last in capture:
            kept[last] = x  # Hugging Face reports the last layer after the final norm
        captured = torch.cat([kept[i] for i in capture], dim=-1) if capture else None
        return ModelOutput(hidden=x, captured=captured)

    def _dense_step(
        self, x: torch.Tensor, positions: torch.Tensor, step: tuple, capture: tuple[int, ...]
    ) -> ModelOutput:
        """Every decoder layer and the final norm in one `dense_layers` call (`use_kernels`)."""
        cfg, rotary = self.config, self.model.rotary
        captured = x.new_empty(x.shape[0], len(capture) * cfg.hidden_size)
        torch.ops.specserve.dense_layers(
            x,
            self._step_weights,
            self.model.norm.weight.detach(),
            rotary.cos[positions],
            rotary.sin[positions],
            *step,
            self.model.layers[0].self_attn.num_heads,
            cfg.intermediate_size,
            cfg.rms_norm_eps,
            list(capture),
            captured,
        )
        return ModelOutput(hidden=x, captured=captured if capture else None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, H] -> logits [M, V] in float32."""
        return self.lm_head(hidden).float()


class Qwen3ForCausalLM(CausalLM):
    pass


class LlamaForCausalLM(CausalLM):
    pass
