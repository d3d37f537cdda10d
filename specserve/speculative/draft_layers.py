"""The draft layer of DFlash / DSpark: a Qwen3 decoder layer whose attention keys and values are
[projected context features; block tokens] (the context projected by the layer's own k/v)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specserve.config import ModelConfig
from specserve.models.layers import Linear, RMSNorm, RotaryEmbedding
from specserve.models.qwen3_moe import make_mlp


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

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        ctx_k: torch.Tensor,
        ctx_v: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), positions, rotary, ctx_k, ctx_v, mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


def rope(rotary: RotaryEmbedding, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., heads, d] by positions [...] (neox style, as `RotaryEmbedding`)."""
    cos = rotary.cos[positions].unsqueeze(-2)
    sin = rotary.sin[positions].unsqueeze(-2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
