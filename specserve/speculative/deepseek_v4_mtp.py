"""NEXTN for DeepSeek-V4: the `mtp.0.*` layer that ships inside the target's checkpoint.

One step at position i reads the target's residual streams before its hyper head, S_i
[hc, H], and the next token t_{i+1}: x = e_proj(enorm(embed(t_{i+1}))) + h_proj(hnorm(S_i)),
broadcast over the streams; one DeepSeek-V4 block (sliding-window attention with the `main`
RoPE, top-k routed MoE) runs on x; its own hyper head, `norm` and the target's `head` score
t_{i+2}. Chaining feeds the block's output streams back in as S. Weight names are the official
ones under `mtp.0.` (`e_proj`, `h_proj`, `enorm`, `hnorm`, `norm`, `hc_head_{fn,base,scale}`,
and the block's `attn.*`, `ffn.*`, `attn_norm`, `ffn_norm`, `hc_{attn,ffn}_*`), as in SGLang's
`deepseek_v4_nextn.py`; `transformers` ignores them, so there is no reference to compare with.

The layer's window K/V per request is a `SequenceState` of one window-only layer: `update`
appends the committed rows (dropping earlier draft rows first), `propose` runs the chain on top
and the next `update` rolls those rows back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from specserve.config import ConfigError
from specserve.core import Request
from specserve.models.deepseek_v4 import (
    Block,
    DeepseekV4ForCausalLM,
    V4Context,
    convert_official_formats,
    hyper_head,
)
from specserve.models.deepseek_v4_cache import SequenceState
from specserve.models.deepseek_v4_config import SLIDING, V4Config
from specserve.models.layers import Linear, RMSNorm
from specserve.models.loader import load_state_dict
from specserve.speculative.base import Drafter, DraftProposal
from specserve.speculative.deferred import DeferredRows
from specserve.speculative.sampling import draw, proposal_probs

PREFIX = "mtp.0."


class MTPLayer(Block):
    """The MTP block plus its input projections and output head (the target's embed/head)."""

    def __init__(self, v4: V4Config) -> None:
        one = replace(v4, num_layers=1, layer_types=(SLIDING,), hash_layers=(False,))
        super().__init__(one, 0)
        h, hc = v4.hidden_size, v4.hc_mult
        self.v4 = one
        self.e_proj, self.h_proj = Linear(h, h), Linear(h, h)
        self.enorm, self.hnorm = RMSNorm(h, v4.rms_norm_eps), RMSNorm(h, v4.rms_norm_eps)
        self.norm = RMSNorm(h, v4.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.zeros(hc, hc * h))
        self.hc_head_base = nn.Parameter(torch.zeros(hc))
        self.hc_head_scale = nn.Parameter(torch.ones(1))

    def step(
        self,
        target: DeepseekV4ForCausalLM,
        next_tokens: torch.Tensor,
        streams: torch.Tensor,
        positions: torch.Tensor,
        ctx: V4Context,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """next_tokens [N], streams [N, hc * H] -> (output streams [N, hc * H], logits [N, V])."""
        n, hc = next_tokens.shape[0], self.v4.hc_mult
        e = self.e_proj(self.enorm(target.embed(next_tokens)))
        x = e.unsqueeze(1) + self.h_proj(self.hnorm(streams.view(n, hc, -1)))
        out = self(x, next_tokens, positions, target.bind_ropes(positions), ctx, 0)
        ctx.finish()
        head = (self.hc_head_fn, self.hc_head_base, self.hc_head_scale)
        hidden = self.norm(hyper_head(out, *head, self.v4))
        return out.flatten(1), target.compute_logits(hidden)

    def new_state(self) -> SequenceState:
        return SequenceState.new([0], [False], self.v4.sliding_window)


def load_mtp_layer(path: str | Path, target: DeepseekV4ForCausalLM) -> MTPLayer:
    """The target checkpoint's first MTP layer, in the target's dtype and device."""
    if target.v4.num_nextn_predict_layers < 1:
        raise ConfigError(f"{path}: num_nextn_predict_layers is 0, the checkpoint has no MTP")
    state = load_state_dict(path, lambda k: k.startswith(PREFIX))
    state = {k[len(PREFIX) :]: v for k, v in state.items()}
    state = convert_official_formats(state, target.v4.fp8_block)
    layer = MTPLayer(target.v4)
    expected = set(layer.state_dict())
    missing, unknown = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unknown:
        what = f"lacks {PREFIX}{missing[0]}" if missing else f"has unknown {PREFIX}{unknown[0]}"
        raise ConfigError(f"{path}: the MTP layer {what}")
    layer.load_state_dict(state)
    ref = target.head.weight
    keep = {n: p.data for n, p in layer.named_parameters() if n.endswith(target.float32_params)}
    layer = layer.to(device=ref.device, dtype=ref.dtype)
    for name, data in keep.items():  # float32 whatever the dtype, as in the target
        layer.get_parameter(name).data = data.to(ref.device)
    return layer.eval().requires_grad_(False)


@dataclass
class _State:
    seq: SequenceState  # the layer's window over rows first_pos..last_pos (+ draft rows)
    last_pos: int  # position of the last committed row
    last_out: torch.Tensor  # [hc * H] its output streams
    last_logits: torch.Tensor  # [V] what they score (the token after the anchor)


class DeepseekV4MTPDrafter(Drafter):
    """Chains the MTP layer `num_steps` times: greedy at temperature 0, else sampled with q."""

    def __init__(self, layer: MTPLayer, target: DeepseekV4ForCausalLM, num_steps: int) -> None:
        self.layer, self.target, self.num_steps = layer, target, num_steps
        self.capture_layers = (target.v4.num_layers - 1,)
        self.states: dict[str, _State] = {}
        self.deferred = DeferredRows()  # `update` defers, `propose` folds in (deferred.py)

    @property
    def max_draft_tokens(self) -> int:
        return self.num_steps

    def release(self, request: Request) -> None:
        self.states.pop(request.request_id, None)
        self.deferred.drop(request.request_id)

    def num_tracked_requests(self) -> int:
        return len(self.states.keys() | self.deferred.pending.keys())

    def update(self, requests: list[Request], hidden: list[torch.Tensor | None]) -> None:
        self.deferred.add(requests, hidden)  # folded in when the request drafts next

    def _catch_up(self, pending: list[tuple[Request, int, torch.Tensor]]) -> None:
        """Run the layer over the pending rows (`DeferredRows.fold`), all in one forward."""
        rows, owners = [], []
        for req, start, h in pending:
            end = start + h.shape[0]
            nxt = req.all_token_ids[start + 1 : end + 1]  # row i pairs S_i with t_{i+1}
            if not nxt:
                continue
            st = self.states.get(req.request_id)
            seq = st.seq if st is not None and start > 0 else self.layer.new_state()
            rows.append((torch.tensor(nxt), h[: len(nxt)], start))
            owners.append((req.request_id, seq))
        if not rows:
            return
        ctx = V4Context.for_states(
            [s for _, s in owners], [r[2] for r in rows], [len(r[0]) for r in rows]
        )
        tokens = torch.cat([r[0] for r in rows]).to(rows[0][1].device)
        positions = torch.cat([torch.arange(s, s + len(t)) for t, _, s in rows])
        out, logits = self.layer.step(
            self.target, tokens, torch.cat([r[1] for r in rows]), positions.to(tokens.device), ctx
        )
        end = 0
        for (rid, seq), (t, _, s) in zip(owners, rows, strict=True):
            end += len(t)
            self.states[rid] = _State(seq, s + len(t) - 1, out[end - 1], logits[end - 1])

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
        streams = torch.stack([s.last_out for s in states])
        logits = torch.stack([s.last_logits for s in states])
        steps = [draw(logits, reqs)]
        for j in range(1, max(ks[i] for i in live)):
            positions = torch.tensor([s.last_pos + j for s in states], device=streams.device)
            ctx = V4Context.for_states(
                [s.seq for s in states], positions.tolist(), [1] * len(states)
            )
            streams, logits = self.layer.step(self.target, steps[-1][0], streams, positions, ctx)
            steps.append(draw(logits, reqs))
        tokens, q, conf = (torch.stack(x, dim=1) for x in zip(*steps, strict=True))
        for j, i in enumerate(live):
            n = ks[i]
            out[i] = DraftProposal(
                tokens[j, :n].tolist(), proposal_probs(q[j, :n], reqs[j]), conf[j, :n]
            )
        return out
