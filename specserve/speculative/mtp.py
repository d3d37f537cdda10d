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
from specserve.core import Request
from specserve.models.attention import AttentionContext, CausalAttention
from specserve.models.layers import Linear, RMSNorm, RotaryEmbedding
from specserve.models.qwen3 import DecoderLayer
from specserve.models.qwen3_moe import make_mlp
from specserve.speculative.base import Drafter, DraftProposal
from specserve.speculative.sampling import draw, proposal_probs


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
        # DeepSeek numbers the MTP layer after the target's layers (sparse in a MoE target)
        self.layers = nn.ModuleList([DecoderLayer(cfg, make_mlp(cfg, cfg.num_hidden_layers))])
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
        return self.layers[0](x, self.rotary.bind(positions), ctx, 0)

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


@dataclass
class _MTPState:
    k: torch.Tensor  # [L, kv, d] the layer's keys of committed rows
    v: torch.Tensor
    first_pos: int  # position of row 0 (> 0 when the prompt's start came from the prefix cache)
    last_pos: int  # position of the last committed row
    last_out: torch.Tensor  # [H] its layer output (scores the token after the anchor)


class MTPDrafter(Drafter):
    """Chains the MTP module `num_steps` times: greedy at temperature 0, else sampled with q."""

    def __init__(self, module: MTPModule, num_target_layers: int, num_steps: int) -> None:
        self.module = module
        self.num_steps = num_steps
        self.capture_layers = (num_target_layers - 1,)
        self.states: dict[str, _MTPState] = {}

    @property
    def max_draft_tokens(self) -> int:
        return self.num_steps

    def release(self, request: Request) -> None:
        self.states.pop(request.request_id, None)

    def _empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.module.config
        w = self.module.eh_proj.weight
        z = w.new_zeros(0, c.num_key_value_heads, c.head_dim)
        return z, z

    @torch.inference_mode()
    def update(self, requests: list[Request], hidden: list[torch.Tensor | None]) -> None:
        xs, pos, prefixes, owners = [], [], [], []
        for req, h in zip(requests, hidden, strict=True):
            if h is None or h.shape[0] == 0 or req.finished:
                continue
            end = req.num_computed_tokens
            start = end - h.shape[0]
            nxt = req.all_token_ids[start + 1 : end + 1]  # row i pairs h_i with t_{i+1}
            h = h[: len(nxt)]
            if h.shape[0] == 0:
                continue
            st = self.states.get(req.request_id)
            if st is not None and st.last_pos < start:  # rows in order: keep the cache
                prefix, first = (st.k, st.v), st.first_pos
            elif st is not None and st.first_pos < start:  # a replay: keep rows before it
                keep = start - st.first_pos
                prefix, first = (st.k[:keep], st.v[:keep]), st.first_pos
            else:
                prefix, first = self._empty(), start
            dev = h.device
            xs.append(self.module.combine(torch.tensor(nxt, device=dev), h))
            pos.append(torch.arange(start, start + h.shape[0], device=dev))
            prefixes.append(prefix)
            owners.append((req.request_id, first))
        if not xs:
            return
        ctx = PrefixAttention(prefixes, [x.shape[0] for x in xs])
        out = self.module.layer(torch.cat(xs), torch.cat(pos), ctx)
        row = 0
        for (rid, first), x, p, pre, (k, v) in zip(
            owners, xs, pos, prefixes, ctx.new_kv, strict=True
        ):
            row += x.shape[0]
            k, v = torch.cat([pre[0], k]), torch.cat([pre[1], v])
            self.states[rid] = _MTPState(k, v, first, int(p[-1]), out[row - 1])

    @torch.inference_mode()
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[DraftProposal]:
        ks = [min(self.num_steps, m) for m in max_tokens]
        live = [
            i
            for i, r in enumerate(requests)
            if ks[i] > 0
            and (st := self.states.get(r.request_id)) is not None
            and st.last_pos == r.num_tokens - 2
        ]
        out = [DraftProposal([]) for _ in requests]
        if not live:
            return out
        reqs = [requests[i] for i in live]
        states = [self.states[r.request_id] for r in reqs]
        prefixes = [(s.k, s.v) for s in states]
        prev_out = torch.stack([s.last_out for s in states])
        steps = []
        for j in range(max(ks[i] for i in live)):
            if j > 0:
                x = self.module.combine(steps[-1][0], prev_out)
                positions = torch.tensor([s.last_pos + j for s in states], device=x.device)
                ctx = PrefixAttention(prefixes, [1] * len(reqs))
                prev_out = self.module.layer(x, positions, ctx)
                prefixes = [
                    (torch.cat([pk, k]), torch.cat([pv, v]))
                    for (pk, pv), (k, v) in zip(prefixes, ctx.new_kv, strict=True)
                ]
            steps.append(draw(self.module.compute_logits(prev_out), reqs))
        tokens, q, conf = (torch.stack(x, dim=1) for x in zip(*steps, strict=True))
        for j, i in enumerate(live):
            n = ks[i]
            out[i] = DraftProposal(
                tokens[j, :n].tolist(), proposal_probs(q[j, :n], reqs[j]), conf[j, :n]
            )
        return out
