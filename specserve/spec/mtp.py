"""NEXTN / MTP: a DeepSeek-style multi-token-prediction module, chained for several draft steps.

One MTP step at position i combines the target's hidden state h_i with the embedding of the next
token t_{i+1}: x_i = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)]) (2H -> H), runs one causal
transformer layer over those rows, and reads the next-next token t_{i+2} through the target's
final norm and LM head (shared, frozen). Chaining feeds the layer's output hidden state back in
as h for the next step. Weight names: `enorm`, `hnorm`, `eh_proj`, `layers.0.*` (a Qwen3 decoder
layer); `embed_tokens`, `lm_head` and `final_norm` are the target's (`share_target`).

Training API (`MTPModule.forward`)::

    out = mtp(input_ids, hidden)
    # input_ids [B, T] long, hidden [B, T, H] the target's last-layer hidden states
    #   (CausalLM.forward(..., capture=(num_layers - 1,)).captured)
    out.hidden [B, T-1, H]  layer output of row i (fed from h_i and t_{i+1})
    out.logits [B, T-1, V]  row i scores t_{i+2} (rows i >= T-2 have no label)
    # depth 2 (chaining): mtp(input_ids[:, 1:], out.hidden) scores t_{i+3} at row i

Inference (`MTPDrafter`): per request, the layer's K/V for every committed position whose next
token is known, grown by `update`; `propose` runs the chain with temporary K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specserve.config import ModelConfig
from specserve.models.attention import AttentionContext, CausalAttention
from specserve.models.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding
from specserve.models.qwen3 import DecoderLayer


@dataclass
class MTPOutput:
    hidden: torch.Tensor  # [B, T-1, H]
    logits: torch.Tensor  # [B, T-1, V]


class MTPModule(nn.Module):
    SHARED = ("embed_tokens", "lm_head", "final_norm")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * h, h)
        mlp = GatedMLP(h, cfg.intermediate_size, cfg.mlp_bias)
        self.layers = nn.ModuleList([DecoderLayer(cfg, mlp)])
        self.final_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = Linear(h, cfg.vocab_size)
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )

    def share_target(self, target: nn.Module) -> None:
        """Use the target's (a `CausalLM`) embedding, final norm and LM head."""
        self.embed_tokens = target.model.embed_tokens
        self.final_norm = target.model.norm
        self.lm_head = target.lm_head

    def combine(self, next_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """next_tokens [...], hidden [..., H] -> layer input [..., H]."""
        e = self.enorm(self.embed_tokens(next_tokens))
        return self.eh_proj(torch.cat([e, self.hnorm(hidden.to(e.dtype))], dim=-1))

    def layer(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext):
        """x [N, H] flattened rows -> layer output [N, H]."""
        return self.layers[0](x, positions, self.rotary, ctx, 0)

    def compute_logits(self, out: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(out)).float()

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> MTPOutput:
        b, t = input_ids.shape
        x = self.combine(input_ids[:, 1:], hidden[:, :-1]).reshape(b * (t - 1), -1)
        positions = torch.arange(t - 1, device=input_ids.device).repeat(b)
        out = self.layer(x, positions, CausalAttention(b, t - 1)).view(b, t - 1, -1)
        return MTPOutput(out, self.compute_logits(out))


class PrefixAttention(AttentionContext):
    """Per sequence: cached prefix K/V [L_i, kv, d] + Q_i new rows, causal over the new rows.

    After `attend`, `new_kv[i]` holds sequence i's new (k, v) so the caller may keep them.
    """

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]], query_lens: list[int]):
        self.prefix, self.query_lens = prefix, query_lens
        self.new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attend(self, layer_idx, q, k, v):
        out, start = [], 0
        self.new_kv = []
        for (pk, pv), n in zip(self.prefix, self.query_lens, strict=True):
            qi, ki, vi = q[start : start + n], k[start : start + n], v[start : start + n]
            self.new_kv.append((ki, vi))
            keys, vals = torch.cat([pk.to(ki.dtype), ki]), torch.cat([pv.to(vi.dtype), vi])
            lp = pk.shape[0]
            mask = (
                torch.arange(lp + n, device=q.device)[None, :]
                <= lp + torch.arange(n, device=q.device)[:, None]
            )
            o = F.scaled_dot_product_attention(
                qi.transpose(0, 1),
                keys.transpose(0, 1),
                vals.transpose(0, 1),
                attn_mask=mask,
                enable_gqa=True,
            )
            out.append(o.transpose(0, 1))
            start += n
        return torch.cat(out)
