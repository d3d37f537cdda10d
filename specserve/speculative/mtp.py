"""NEXTN / MTP: a DeepSeek-style multi-token-prediction module, chained for several draft steps.

One MTP step at position i combines the target's hidden state h_i with the embedding of the next
token t_{i+1}: x_i = eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)]) (2H -> H), runs one causal
transformer layer over those rows, and reads the next-next token t_{i+2} through the target's
final norm and LM head (shared, frozen). Chaining feeds the layer's output hidden state back in
as h for the next step. Weight names: `enorm`, `hnorm`, `eh_proj`, `layers.0.*` (a Qwen3 decoder
layer); `embed_tokens`, `lm_head` and `final_norm` are the target's (`share_target` with a
`TargetHandle`).

Training API (`MTPModule.forward`)::

    out = mtp(input_ids, hidden)
    # input_ids [B, T] long, hidden [B, T, H] the target's last-layer hidden states
    #   (CausalLM.forward(..., capture=(num_layers - 1,)).captured)
    out.hidden [B, T-1, H]  layer output of row i (fed from h_i and t_{i+1})
    out.logits [B, T-1, V]  row i scores t_{i+2} (rows i >= T-2 have no label)
    # depth 2 (chaining): mtp(input_ids[:, 1:], out.hidden) scores t_{i+3} at row i

Inference (`MTPDrafter`): per request, the layer's K/V for every committed position whose next
token is known (`KVRows`, grown in place); `update` defers the rows and `propose` first runs the
layer over those of the requests it drafts for (`deferred.py`), then runs the chain, whose K/V
rows are scratch past the committed ones. Both attend for all requests in one call
(`RowAttention`: the C++ kernel with `--attention-backend cpp`, else SDPA per request).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from specserve.config import ModelConfig
from specserve.core import Request
from specserve.models.attention import AttentionContext, CausalAttention
from specserve.models.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding
from specserve.models.qwen3 import DecoderLayer
from specserve.models.qwen3_moe import make_mlp
from specserve.speculative.base import Drafter, DraftProposal
from specserve.speculative.deferred import DeferredRows
from specserve.speculative.draft_layers import DraftLayer
from specserve.speculative.fused_draft import layer_weights
from specserve.speculative.handle import TargetHandle
from specserve.speculative.kv_rows import KVRows, RowAttention
from specserve.speculative.sampling import Pick, draw, proposal_probs


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
        #: the target layer whose hidden states the module reads (set by `share_target`)
        self.capture_layers: tuple[int, ...] = ()

    def share_target(self, target: TargetHandle, names: tuple[str, ...] = SHARED) -> None:
        """Use the target's embedding, final norm and LM head (`names`: the parts this module
        has no own copy of); the module reads the target's last layer."""
        self.capture_layers = target.capture((target.num_layers - 1,))
        for name in names:
            setattr(self, name, getattr(target, "norm" if name == "final_norm" else name))

    def combine(self, next_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """next_tokens [...], hidden [..., H] -> layer input [..., H]."""
        e = self.enorm(self.embed_tokens(next_tokens))
        return self.eh_proj(torch.cat([e, self.hnorm(hidden.to(e.dtype))], dim=-1))

    def layer(
        self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """x [N, H] flattened rows -> layer output [N, H]."""
        return self.layers[0](x, self.rotary.bind(positions), ctx, 0)

    def keys_values(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K, V [N, kv, d] of layer inputs x [N, H]: all a row that no chain step
        reads the output of contributes (its attention and MLP are not needed)."""
        layer = cast(DecoderLayer, self.layers[0])
        _, k, v = layer.self_attn.project(layer.input_layernorm(x), self.rotary.bind(positions))
        return k, v

    def compute_logits(self, out: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(out)).float()

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> MTPOutput:
        b, t = input_ids.shape
        x = self.combine(input_ids[:, 1:], hidden[:, :-1]).reshape(b * (t - 1), -1)
        positions = torch.arange(t - 1, device=input_ids.device).repeat(b)
        out = self.layer(x, positions, CausalAttention(b, t - 1)).view(b, t - 1, -1)
        return MTPOutput(out, self.compute_logits(out))

    def draft(
        self,
        hidden: torch.Tensor,
        anchor_positions: torch.Tensor,
        ctx: AttentionContext,
        k: int,
        pick: Pick,
    ) -> tuple[torch.Tensor, ...]:
        """Chain k steps (serving and offline evaluation alike): hidden [..., H] is the layer
        output of the row before the anchor (it scores the token after the anchor), anchor
        positions [...]; `ctx` holds the module's K/V of the committed rows and keeps each step's
        rows. Step s feeds back the token picked at step s - 1 and its hidden state.
        -> pick's outputs per step stacked on a step axis (tokens [..., k] first)."""
        steps = [pick(self.compute_logits(hidden))]
        for s in range(1, k):
            x = self.combine(steps[-1][0], hidden).reshape(-1, hidden.shape[-1])
            # past a request's own lookahead (discarded) a step stays inside the RoPE table
            pos = (anchor_positions + s - 1).clamp(max=self.rotary.cos.shape[0] - 1).reshape(-1)
            hidden = self.layer(x, pos, ctx).view(hidden.shape)
            steps.append(pick(self.compute_logits(hidden)))
        dim = anchor_positions.dim()
        return tuple(torch.stack(x, dim=dim) for x in zip(*steps, strict=True))


@dataclass
class _MTPState:
    rows: KVRows  # the layer's K/V of committed rows (row i: position first_pos + i)
    first_pos: int  # position of row 0 (> 0 when the prompt's start came from the prefix cache)
    last_pos: int  # position of the last committed row
    last_out: torch.Tensor  # [H] its layer output (scores the token after the anchor)


class MTPDrafter(Drafter):
    """Chains the MTP module `num_steps` times: greedy at temperature 0, else sampled with q."""

    def __init__(self, module: MTPModule, num_steps: int) -> None:
        self.module = module
        self.num_steps = num_steps
        self.capture_layers = module.capture_layers
        self.states: dict[str, _MTPState] = {}
        self.deferred = DeferredRows()
        # the C++ kernels are loaded and the layer runs in float32 on the CPU (`tile_products`
        # tiled its products): attention through `row_attention`, else the PyTorch path
        self.kernel = hasattr(module.eh_proj.weight, "tiled")
        # and where the layer fits it, an all-greedy chain in one call (`mtp_chain`)
        self.fused = _FusedChain.of(module) if self.kernel else None

    @property
    def max_draft_tokens(self) -> int:
        return self.num_steps

    def release(self, request: Request) -> None:
        self.states.pop(request.request_id, None)
        self.deferred.drop(request.request_id)

    def num_tracked_requests(self) -> int:
        return len(self.states.keys() | self.deferred.pending.keys())

    def _new_rows(self) -> KVRows:
        c = self.module.config
        return KVRows(c.num_key_value_heads, c.head_dim, self.module.eh_proj.weight)

    def update(self, requests: list[Request], hidden: list[torch.Tensor | None]) -> None:
        self.deferred.add(requests, hidden)  # folded in when the request drafts next

    def _catch_up(self, pending: list[tuple[Request, int, torch.Tensor]]) -> None:
        """Fold the pending rows (`DeferredRows.fold`) in, all in one batch: the K/V of every
        row, the layer's output of each request's last."""
        toks, hs, pos, rows, owners = [], [], [], [], []
        for req, start, h in pending:
            end = start + h.shape[0]
            nxt = req.all_token_ids[start + 1 : end + 1]  # row i pairs h_i with t_{i+1}
            h = h[: len(nxt)]
            if h.shape[0] == 0:
                continue
            st = self.states.get(req.request_id)
            if st is not None and st.first_pos < start:  # keep the rows before `start`
                kv, first = st.rows, st.first_pos
                kv.length = min(kv.length, start - first)  # a replay drops those after it
            else:
                kv, first = self._new_rows(), start
            kv.reserve(kv.length + h.shape[0] + self.num_steps)  # room for a chain too
            toks += nxt
            hs.append(h)
            pos.append(torch.arange(start, start + h.shape[0], device=h.device))
            rows.append(kv)
            owners.append((req.request_id, first))
        if not hs:
            return
        lens = [h.shape[0] for h in hs]
        x = self.module.combine(torch.tensor(toks, device=hs[0].device), torch.cat(hs))
        positions = torch.cat(pos)
        # Only a request's last row feeds the chain (`last_out`); the rows before it need only
        # their K/V (the layer's projections), not its attention and MLP.
        last = torch.tensor(lens).cumsum(0) - 1
        if len(x) > len(lens):
            before = torch.ones(len(x), dtype=torch.bool)
            before[last] = False
            k, v = self.module.keys_values(x[before], positions[before])
            row = 0
            for kv, n in zip(rows, lens, strict=True):
                end = kv.length + n - 1
                kv.k[:, kv.length : end].copy_(k[row : row + n - 1].transpose(0, 1))
                kv.v[:, kv.length : end].copy_(v[row : row + n - 1].transpose(0, 1))
                row += n - 1
        starts = [kv.length + n - 1 for kv, n in zip(rows, lens, strict=True)]
        ctx = RowAttention(rows, starts, [1] * len(rows), self.kernel)
        out = self.module.layer(x[last], positions[last], ctx)
        for j, ((rid, first), n, p, kv) in enumerate(zip(owners, lens, pos, rows, strict=True)):
            kv.length += n
            self.states[rid] = _MTPState(kv, first, int(p[-1]), out[j])

    @torch.inference_mode()
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[DraftProposal]:
        ks = [min(self.num_steps, m) for m in max_tokens]
        self.catch_up = self.deferred.fold(
            [r for r, k in zip(requests, ks, strict=True) if k > 0], self._catch_up
        )
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
        hidden = torch.stack([s.last_out for s in states])
        anchor_pos = torch.tensor([s.last_pos + 1 for s in states], device=hidden.device)
        k = max(ks[i] for i in live)
        rows = [s.rows for s in states]
        for kv in rows:
            kv.reserve(kv.length + k)  # the chain's rows, scratch past the committed ones
        if self.fused is not None and all(r.params.greedy for r in reqs):
            tokens, conf = self.fused(hidden, anchor_pos, rows, k)
            q = hidden.new_empty(len(reqs), k, 0)  # greedy: no q (`draw`)
        else:
            ctx = RowAttention(rows, [kv.length for kv in rows], [1] * len(reqs), self.kernel)
            tokens, q, conf = self.module.draft(
                hidden, anchor_pos, ctx, k, lambda logits: draw(logits, reqs)
            )
        for j, i in enumerate(live):
            n = ks[i]
            out[i] = DraftProposal(
                tokens[j, :n].tolist(), proposal_probs(q[j, :n], reqs[j]), conf[j, :n]
            )
        return out


@dataclass(frozen=True)
class _FusedChain:
    """The weights `mtp_chain` reads (`kernels/row_attention.cpp`), gathered once: a dense
    Qwen3-style layer with q/k norms, every product tiled, no biases."""

    layer: list[torch.Tensor]  # in_norm, q, k, v, q_norm, k_norm, o, post_norm, gate, up, down
    module: MTPModule

    @classmethod
    def of(cls, module: MTPModule) -> _FusedChain | None:
        layer = cast(DecoderLayer, module.layers[0])
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, module.eh_proj]
        if type(mlp) is not GatedMLP or not attn.qk_norm:
            return None
        linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj, module.lm_head]
        if any(type(m) is not Linear or m.bias is not None for m in linears) or not all(
            hasattr(m.weight, "tiled") for m in linears
        ):
            return None
        if module.lm_head.weight.shape[0] != module.embed_tokens.weight.shape[0]:
            return None  # the chain reads the vocabulary size off the embedding
        return cls(layer_weights(cast(DraftLayer, layer)), module)

    def __call__(
        self, hidden: torch.Tensor, anchor_pos: torch.Tensor, rows: list[KVRows], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens [R, k], confidence proxy [R, k] (max softmax, as `draw`)."""
        m, cfg = self.module, self.module.config
        return torch.ops.specserve.mtp_chain(
            hidden.contiguous(),
            anchor_pos.contiguous(),
            k,
            self.layer,
            m.enorm.weight.detach(),
            m.hnorm.weight.detach(),
            m.eh_proj.weight.tiled,  # type: ignore[attr-defined]
            m.final_norm.weight.detach(),
            m.lm_head.weight.tiled,  # type: ignore[attr-defined]
            m.embed_tokens.weight.detach().contiguous(),
            m.rotary.cos,
            m.rotary.sin,
            [kv.k for kv in rows],
            [kv.v for kv in rows],
            torch.tensor([kv.length for kv in rows], dtype=torch.long),
            cfg.num_attention_heads,
            cfg.intermediate_size,
            cfg.rms_norm_eps,
        )
