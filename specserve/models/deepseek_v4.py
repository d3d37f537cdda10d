"""DeepSeek-V4 (`DeepseekV4ForCausalLM`), checked against `transformers` 5.24.

* Attention is shared-KV multi-query: one head K = V, a low-rank query (`wq_a` -> `q_norm` ->
  `wq_b` -> unweighted per-head RMSNorm), a learned sink per head, interleaved RoPE on the last
  `rope_dim` dims (and its inverse on the output), a grouped low-rank output (`wo_a`, `wo_b`).
* Every layer has a sliding window; CSA layers add overlapping gated-softmax compression of
  K/V every `ratio` tokens and a lightning indexer keeping the top `index_topk` entries per
  query; HCA layers add non-overlapping compression with every entry visible.
* Window-only layers use the `main` RoPE; CSA / HCA layers, compressors and indexer the
  `compress` (YaRN) one.
* `hc_mult` residual streams, mixed around each sublayer with Sinkhorn-normalised weights and
  collapsed by the hyper head before the final norm.
* MoE in every layer: sqrt-softplus scores, top-k on score + bias (or the `tid2eid` hash table
  in the first layers), one shared expert, SwiGLU clamped at `swiglu_limit`.

Module names are the official checkpoint's (`layers.N.attn.wq_a`, `layers.N.ffn.experts.E.w1`,
`hc_head_fn`, `head`); `checkpoint_key` maps what `save_pretrained` writes onto them. Each
forward runs over a flattened batch whose per-request state (`deepseek_v4_cache`) travels in a
`V4Context`; dense products are batched, the attention itself runs per request.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specserve.config import ConfigError, ModelConfig
from specserve.models.deepseek_v4_cache import CompressorState, SequenceState
from specserve.models.deepseek_v4_config import CSA, SLIDING, V4Config
from specserve.models.layers import Linear, RMSNorm
from specserve.models.parallel import Parallel, column_linear, mark, row_linear
from specserve.models.qwen3 import ModelOutput
from specserve.models.qwen3_moe import MOE_BACKENDS, MXFP4Linear
from specserve.quant.deepseek_fp import FP8, dequantize_fp8_blocks, fp4_to_mxfp4
from specserve.quant.mxfp4 import MXFP4Weight


@dataclass
class V4Context:
    """The requests of one forward: their states and row ranges in the flattened batch."""

    states: list[SequenceState]
    spans: list[tuple[int, int]]

    @classmethod
    def fresh(cls, model: DeepseekV4ForCausalLM, lengths: list[int]) -> V4Context:
        """Empty states for sequences of `lengths` tokens laid out one after another."""
        states = [model.new_state() for _ in lengths]
        return cls.for_states(states, [0] * len(lengths), lengths)

    @classmethod
    def for_states(
        cls, states: list[SequenceState], starts: list[int], lengths: list[int]
    ) -> V4Context:
        spans, row = [], 0
        for state, start, n in zip(states, starts, lengths, strict=True):
            state.prepare(start, n)
            spans.append((row, row + n))
            row += n
        return cls(states, spans)

    def finish(self) -> None:
        for state in self.states:
            state.finish_forward()


# -- small pieces -------------------------------------------------------------------------------


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a weight, in float32."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rope_inv_freq(dim: int, params: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (one per pair) and the cos/sin scale, as transformers computes them
    for `default` and `yarn`."""
    base = float(params["rope_theta"])
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    kind = params.get("rope_type", "default")
    if kind == "default":
        return 1.0 / pos, 1.0
    if kind != "yarn":
        raise ValueError(f"DeepSeek-V4 rope_type {kind!r} is not supported")
    factor = float(params["factor"])
    old = params["original_max_position_embeddings"]
    scale = params.get("attention_factor")
    if scale is None:
        scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def corr(rot: float) -> float:
        return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr(params.get("beta_fast") or 32), corr(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extra = 1 - ramp
    return (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra, float(scale)


class InterleavedRope(nn.Module):
    """RoPE on consecutive channel pairs of the last `dim` channels."""

    def __init__(self, dim: int, params: dict) -> None:
        super().__init__()
        inv, self.scale = rope_inv_freq(dim, params)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.params, self.dim = params, dim

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq
        return freqs.cos() * self.scale, freqs.sin() * self.scale

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [N, ..., D]; cos, sin [N, dim/2] -> x with its last dim channels rotated."""
        while cos.dim() < x.dim():
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rd = 2 * cos.shape[-1]
        rope = x[..., -rd:].float()
        even, odd = rope[..., 0::2], rope[..., 1::2]
        rot = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
        return torch.cat([x[..., :-rd], rot.to(x.dtype)], dim=-1)


# -- compression --------------------------------------------------------------------------------


class Compressor(nn.Module):
    """Gated-softmax pooling of `ratio` tokens into one entry (HCA), or of two overlapping
    windows of half-series (CSA: `wkv`/`wgate` give 2 * dim channels, the first half feeding
    the next window's entry)."""

    def __init__(self, hidden: int, dim: int, ratio: int, overlap: bool, eps: float) -> None:
        super().__init__()
        width = 2 * dim if overlap else dim
        self.wkv = Linear(hidden, width)
        self.wgate = Linear(hidden, width)
        self.ape = nn.Parameter(torch.zeros(ratio, width))
        self.norm = RMSNorm(dim, eps)
        self.dim, self.ratio, self.overlap = dim, ratio, overlap

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.wkv(x), self.wgate(x)

    def extend(
        self, state: CompressorState, kv: torch.Tensor, gate: torch.Tensor, rope: InterleavedRope
    ) -> torch.Tensor:
        """Add one request's new raw rows, emit the entries of newly completed windows; returns
        all its entries [E, dim]."""
        state.append_raw(kv, gate)
        first, last = state.num_entries, state.raw_end() // self.ratio
        if last > first:
            new = self._compress(state, first, last, rope)
            state.entries = new if state.entries is None else torch.cat([state.entries, new])
        if state.entries is None:
            state.entries = kv.new_zeros(0, self.dim)
        return state.entries

    def _compress(
        self, state: CompressorState, first: int, last: int, rope: InterleavedRope
    ) -> torch.Tensor:
        r, d, n = self.ratio, self.dim, last - first
        lo = first * r - state.raw_start
        kv = state.raw_kv[lo : lo + n * r].view(n, r, -1)
        gate = state.raw_gate[lo : lo + n * r].view(n, r, -1) + self.ape
        if self.overlap:  # slots [prev window's first half | this window's second half]
            prev_kv = kv.new_zeros(n, r, d)
            prev_gate = gate.new_full((n, r, d), float("-inf"))
            prev_kv[1:], prev_gate[1:] = kv[:-1, :, :d], gate[:-1, :, :d]
            if first > 0:
                p = lo - r
                prev_kv[0] = state.raw_kv[p : p + r, :d]
                prev_gate[0] = state.raw_gate[p : p + r, :d] + self.ape[:, :d]
            kv = torch.cat([prev_kv, kv[..., d:]], dim=1)
            gate = torch.cat([prev_gate, gate[..., d:]], dim=1)
        weights = gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)
        pooled = self.norm((kv * weights).sum(dim=1))
        positions = torch.arange(first, last, device=kv.device) * r
        return rope.apply(pooled, *rope.cos_sin(positions))


class Indexer(nn.Module):
    """Lightning indexer: score_s = sum_h w_h * relu(q_h . k_s) over its own compressed keys;
    each query keeps the top `index_topk` entries it may see."""

    def __init__(self, cfg: V4Config, ratio: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.topk = (
            cfg.index_n_heads,
            cfg.index_head_dim,
            cfg.index_topk,
        )
        self.wq_b = Linear(cfg.q_lora_rank, self.num_heads * self.head_dim)
        self.weights_proj = Linear(cfg.hidden_size, self.num_heads)
        self.compressor = Compressor(cfg.hidden_size, self.head_dim, ratio, True, cfg.rms_norm_eps)


# -- attention ----------------------------------------------------------------------------------


class Attention(nn.Module):
    """Under --tp-size the query heads, their sinks and the output groups are split (each rank
    whole groups of consecutive heads); the K=V head, compressors and indexer are replicated."""

    def __init__(self, cfg: V4Config, layer: int, par: Parallel | None = None) -> None:
        super().__init__()
        tp = par.tp_size if par else 1
        h, d, hidden, g = cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.o_groups
        self.num_heads, self.head_dim, self.window = h // tp, d, cfg.sliding_window
        self.groups, self.eps = g // tp, cfg.rms_norm_eps
        self.wq_a = Linear(hidden, cfg.q_lora_rank)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = column_linear(cfg.q_lora_rank, h * d, False, par)
        self.wkv = Linear(hidden, d)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.wo_a = column_linear(h * d // g, g * cfg.o_lora_rank, False, par)
        self.wo_b = row_linear(g * cfg.o_lora_rank, hidden, False, par)
        self.attn_sink = nn.Parameter(torch.zeros(h // tp))
        if par is not None:
            mark(self, 0, par.tp_rank, tp)  # attn_sink, the one tensor this module owns
        kind, self.ratio = cfg.layer_types[layer], cfg.compress_rate(layer)
        self.rope_kind = "main" if kind == SLIDING else "compress"
        self.compressor = (
            Compressor(hidden, d, self.ratio, kind == CSA, cfg.rms_norm_eps) if self.ratio else None
        )
        self.indexer = Indexer(cfg, self.ratio) if kind == CSA else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        ropes: dict[str, tuple[InterleavedRope, torch.Tensor, torch.Tensor]],
        ctx: V4Context,
        layer_idx: int,
    ) -> torch.Tensor:
        rope, cos, sin = ropes[self.rope_kind]
        q_res = self.q_norm(self.wq_a(x))
        q = self.query(q_res, rope, cos, sin)
        kv = self.key_value(x, rope, cos, sin)
        comp = self.compressor.project(x) if self.compressor is not None else None
        index = self._index_inputs(x, q_res, ropes["compress"]) if self.indexer else None
        out = torch.empty_like(q)
        for state, (a, b) in zip(ctx.states, ctx.spans, strict=True):
            layer = state.layers[layer_idx]
            keys, bias = self._window_keys(layer, kv[a:b], positions[a:b])
            if comp is not None:
                entries, entry_bias = self._entries(
                    layer, comp, index, a, b, positions[a:b], ropes["compress"][0]
                )
                keys, bias = torch.cat([keys, entries]), torch.cat([bias, entry_bias], dim=1)
            out[a:b] = self._attend(q[a:b], keys, bias)
        return self.output(out, rope, cos, sin)

    def query(self, q_res: torch.Tensor, rope: InterleavedRope, cos, sin) -> torch.Tensor:
        """Low-rank query q_res [n, q_lora] -> per-head RMS-normed, rotated q [n, h, d]."""
        q = self.wq_b(q_res).view(q_res.shape[0], self.num_heads, self.head_dim)
        return rope.apply(unit_rms(q, self.eps), cos, sin)

    def key_value(self, x: torch.Tensor, rope: InterleavedRope, cos, sin) -> torch.Tensor:
        """The one K=V head of x [n, hidden]: normed and rotated, [n, d]."""
        return rope.apply(self.norm(self.wkv(x)), cos, sin)

    def output(self, out: torch.Tensor, rope: InterleavedRope, cos, sin) -> torch.Tensor:
        """Attention output [n, h, d] -> un-rotated, grouped low-rank projection [n, hidden]."""
        n = out.shape[0]
        out = rope.apply(out, cos, -sin)
        grouped = out.reshape(n, self.groups, -1).transpose(0, 1)  # [g, n, h*d/g]
        w = self.wo_a.weight.view(self.groups, -1, grouped.shape[-1])  # [g, o_lora, h*d/g]
        mixed = torch.bmm(grouped, w.transpose(1, 2)).transpose(0, 1).reshape(n, -1)
        return self.wo_b(mixed)

    def _index_inputs(self, x, q_res, compress_rope):
        idx = self.indexer
        rope, cos, sin = compress_rope
        q = idx.wq_b(q_res).view(x.shape[0], idx.num_heads, idx.head_dim)
        weights = idx.weights_proj(x).float() * idx.num_heads**-0.5
        return rope.apply(q, cos, sin), weights, idx.compressor.project(x)

    def _window_keys(self, layer, kv, positions):
        """Window K=V of the cached tail plus the new tokens, and the additive mask [q, keys]."""
        if layer.window is None:
            layer.window, layer.window_start = kv, int(positions[0])
        else:
            layer.window = torch.cat([layer.window, kv])
        key_pos = torch.arange(layer.window.shape[0], device=kv.device) + layer.window_start
        rel = positions[:, None] - key_pos[None, :]
        visible = (rel >= 0) & (rel < self.window)
        return layer.window, torch.zeros(visible.shape, device=kv.device).masked_fill(
            ~visible, float("-inf")
        )

    def _entries(self, layer, comp, index, a, b, positions, rope):
        """This request's compressed entries and which each query sees (additive [q, E])."""
        entries = self.compressor.extend(layer.compressor, comp[0][a:b], comp[1][a:b], rope)
        limit = (positions + 1) // self.ratio  # query p sees entries w < (p + 1) // ratio
        ar = torch.arange(entries.shape[0], device=entries.device)
        visible = ar[None, :] < limit[:, None]
        if index is not None:
            visible &= self._select(layer, index, a, b, rope, visible)
        bias = torch.zeros(visible.shape, device=entries.device).masked_fill(
            ~visible, float("-inf")
        )
        return entries, bias

    def _select(self, layer, index, a, b, rope, visible):
        """Indexer top-k among the entries each query may see ([q, E] bool)."""
        q, weights, (ikv, igate) = index
        idx = self.indexer
        keys = idx.compressor.extend(layer.indexer, ikv[a:b], igate[a:b], rope)
        scores = F.relu(torch.einsum("qhd,ed->qhe", q[a:b].float(), keys.float()))
        scores = (scores * idx.head_dim**-0.5 * weights[a:b, :, None]).sum(dim=1)
        scores = scores.masked_fill(~visible, float("-inf"))
        k = min(idx.topk, keys.shape[0])
        chosen = torch.zeros_like(visible)
        if k:
            chosen.scatter_(1, scores.topk(k, dim=-1).indices, True)
        return chosen

    def _attend(self, q, keys, bias):
        """q [s, h, d], keys [L, d] (= values), bias [s, L] -> [s, h, d], with the sink."""
        logits = torch.einsum("shd,ld->hsl", q, keys) * self.head_dim**-0.5 + bias
        sink = self.attn_sink.view(-1, 1, 1).expand(-1, q.shape[0], 1).to(logits.dtype)
        probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
        return torch.einsum("hsl,ld->shd", probs.to(keys.dtype), keys)


# -- hyper-connections and MoE ------------------------------------------------------------------


class HyperMix:
    """The mHC weights of one sublayer site (parameters live on the decoder layer)."""

    @staticmethod
    def weights(streams, fn, base, scale, iters, eps, norm_eps):
        """streams [N, hc, H] -> post [N, hc], comb [N, hc, hc], collapsed input [N, H]."""
        n, hc = streams.shape[0], streams.shape[1]
        mix = F.linear(unit_rms(streams.reshape(n, -1).float(), norm_eps), fn.float())
        pre_w, post_w, comb_w = mix.split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = base.split([hc, hc, hc * hc])
        pre = torch.sigmoid(pre_w * scale[0] + pre_b) + eps
        post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
        comb = torch.softmax(comb_w.view(n, hc, hc) * scale[2] + comb_b.view(hc, hc), -1) + eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        for _ in range(iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
        return post, comb, collapsed

    @staticmethod
    def combine(streams, out, post, comb):
        dtype = streams.dtype
        mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), streams)
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + mixed


def hyper_head(streams, fn, base, scale, v4: V4Config) -> torch.Tensor:
    """Collapse the streams [N, hc, H] into one hidden state [N, H] (no Sinkhorn here)."""
    flat = unit_rms(streams.flatten(1).float(), v4.rms_norm_eps)
    pre = torch.sigmoid(F.linear(flat, fn.float()) * scale.float() + base.float()) + v4.hc_eps
    return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)


class Expert(nn.Module):
    """SwiGLU with the gate clamped above and up clamped both ways at `limit`; `fp4`: weights
    in MXFP4 (`weight_blocks` / `weight_scales`, from the checkpoint's FP4 experts)."""

    def __init__(self, hidden: int, inter: int, limit: float, fp4: bool = False) -> None:
        super().__init__()
        make = MXFP4Linear if fp4 else Linear
        self.w1, self.w2, self.w3 = make(hidden, inter), make(inter, hidden), make(hidden, inter)
        self.limit = limit

    def set_backend(self, backend: str, dtype: torch.dtype) -> None:
        for name in ("w1", "w2", "w3"):
            proj = getattr(self, name)
            if backend == "mxfp4" and isinstance(proj, Linear):
                new = MXFP4Linear.from_weight(MXFP4Weight.from_dense(proj.weight.detach()))
            elif backend == "torch" and isinstance(proj, MXFP4Linear):
                w = MXFP4Weight(proj.weight_blocks, proj.weight_scales).dequantize(dtype)
                new = Linear(w.shape[1], w.shape[0])
                new.weight = nn.Parameter(w, requires_grad=False)
            else:
                continue
            if hasattr(proj, "shard"):
                new.shard = proj.shard
            setattr(self, name, new)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w1(x).clamp(max=self.limit)
        up = self.w3(x).clamp(min=-self.limit, max=self.limit)
        return self.w2(F.silu(gate) * up)


class Gate(nn.Module):
    """Router: scores from `weight`; experts by top-k of score + `bias`, or by `tid2eid`."""

    def __init__(self, cfg: V4Config, hashed: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        if hashed:
            self.register_buffer(
                "tid2eid", torch.zeros(cfg.vocab_size, cfg.top_k, dtype=torch.long)
            )
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.num_experts))
        self.hashed, self.top_k = hashed, cfg.top_k
        self.scoring, self.scale = cfg.scoring_func, cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor):
        logits = F.linear(x, self.weight).float()
        if self.scoring == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        elif self.scoring == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, dim=-1)
        if self.hashed:
            ids = self.tid2eid[input_ids].long()
        else:
            ids = torch.topk(scores + self.bias.float(), self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scale).to(x.dtype), ids


class MoE(nn.Module):
    """Router, this rank's routed experts (keyed by global id; under --ep-size a slice of them,
    each split by intermediate dim over the ranks of its expert group) and the replicated
    shared expert, added after the routed partial sums are all-reduced."""

    def __init__(self, cfg: V4Config, layer: int, par: Parallel | None = None) -> None:
        super().__init__()
        par = par or Parallel.single()
        hidden, inter, limit = cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit
        self.gate = Gate(cfg, cfg.hash_layers[layer])
        per = cfg.num_experts // par.ep_size
        self.local = range(par.ep_rank * per, (par.ep_rank + 1) * per)
        split, part = par.expert_split, par.expert_split_rank
        self.experts = nn.ModuleDict()
        for e in self.local:
            expert = Expert(hidden, inter // split, limit, cfg.fp4_experts)
            mark(expert.w1, 0, part, split)
            mark(expert.w3, 0, part, split)
            mark(expert.w2, 1, part, split)
            self.experts[str(e)] = expert
        self.shared_experts = Expert(hidden, inter, limit)
        self.par = par

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x, input_ids)
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            if e in self.local:
                tok, slot = (ids == e).nonzero(as_tuple=True)
                out.index_add_(0, tok, self.experts[str(e)](x[tok]) * weights[tok, slot, None])
        return self.par.world_all_reduce(out) + self.shared_experts(x)


# -- the model ----------------------------------------------------------------------------------


class Block(nn.Module):
    attention: type[Attention] = Attention  # a drafter's stage swaps in its own attention

    def __init__(self, cfg: V4Config, layer: int, par: Parallel | None = None) -> None:
        super().__init__()
        hc, hidden = cfg.hc_mult, cfg.hidden_size
        mix = (2 + hc) * hc
        self.attn = self.attention(cfg, layer, par)
        self.ffn = MoE(cfg, layer, par)
        self.attn_norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(hidden, cfg.rms_norm_eps)
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.zeros(mix, hc * hidden)))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.zeros(mix)))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.ones(3)))
        self.iters, self.eps, self.norm_eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps

    def _mix(self, site: str, streams: torch.Tensor):
        p = [getattr(self, f"hc_{site}_{k}") for k in ("fn", "base", "scale")]
        return HyperMix.weights(streams, *p, self.iters, self.eps, self.norm_eps)

    def forward(self, streams, input_ids, positions, ropes, ctx, layer_idx):
        post, comb, x = self._mix("attn", streams)
        out = self.attn(self.attn_norm(x), positions, ropes, ctx, layer_idx)
        streams = HyperMix.combine(streams, out, post, comb)
        post, comb, x = self._mix("ffn", streams)
        out = self.ffn(self.ffn_norm(x), input_ids)
        return HyperMix.combine(streams, out, post, comb)


def convert_official_formats(
    state: dict[str, torch.Tensor], fp8_block: int
) -> dict[str, torch.Tensor]:
    """`X.weight` + `X.scale` pairs of the official checkpoint -> dense or MXFP4 tensors."""
    out = {}
    for name, t in state.items():
        base = name.removesuffix(".weight")
        scale = state.get(base + ".scale") if name.endswith(".weight") else None
        if name.endswith(".scale") and name.removesuffix(".scale") + ".weight" in state:
            continue  # consumed with its weight
        if scale is not None and t.dtype == torch.int8:
            out[base + ".weight_blocks"], out[base + ".weight_scales"] = fp4_to_mxfp4(t, scale)
        elif scale is not None and t.dtype == FP8:
            out[name] = dequantize_fp8_blocks(t, scale, fp8_block)
        else:
            out[name] = t
    return out


_LAYER_EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.")
_HF_NAMES = (  # what `save_pretrained` writes -> the official names used here
    (re.compile(r"^model\."), ""),
    (re.compile(r"^embed_tokens\."), "embed."),
    (re.compile(r"^hc_head\.hc_(fn|base|scale)$"), r"hc_head_\1"),
)


class DeepseekV4ForCausalLM(nn.Module):
    """forward(input_ids, positions, ctx, capture) -> ModelOutput; compute_logits(hidden)."""

    supports_prefix_caching = False  # compressed state is not block-aligned to page boundaries
    # kept in float32 whatever --dtype says, like transformers' _keep_in_fp32_modules_strict
    float32_params = ("_fn", "_base", "_scale", "attn_sink", ".ape", "gate.bias")

    def __init__(self, cfg: ModelConfig, par: Parallel | None = None) -> None:
        """`par`: this rank's shard (see `check_parallel`); the embedding and head stay whole,
        so drafters on rank 0 share them without collectives."""
        super().__init__()
        v4 = V4Config.from_model_config(cfg)
        self.config, self.v4 = cfg, v4
        self.embed = nn.Embedding(v4.vocab_size, v4.hidden_size)
        self.layers = nn.ModuleList(Block(v4, i, par) for i in range(v4.num_layers))
        self.norm = RMSNorm(v4.hidden_size, v4.rms_norm_eps)
        hc = v4.hc_mult
        self.hc_head_fn = nn.Parameter(torch.zeros(hc, hc * v4.hidden_size))
        self.hc_head_base = nn.Parameter(torch.zeros(hc))
        self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.head = Linear(v4.hidden_size, v4.vocab_size)
        self.init_buffers()

    # -- loading -----------------------------------------------------------------------------
    @staticmethod
    def checkpoint_key(name: str) -> str | None:
        """Our name for a checkpoint tensor (None: not ours, e.g. the MTP layers)."""
        for pattern, repl in _HF_NAMES:
            name = pattern.sub(repl, name)
        return None if name.startswith("mtp.") else name

    def holds_weight(self, name: str) -> bool:
        """False for another expert-parallel rank's routed experts (the loader skips them)."""
        m = _LAYER_EXPERT.search(name)
        if m is None or name.startswith("mtp."):
            return True
        return int(m.group(2)) in self.layers[int(m.group(1))].ffn.local

    def convert_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors -> ours: names (`checkpoint_key`), FP8 weights dequantised by
        their block scales, FP4 experts as MXFP4 blocks and scales."""
        state = {new: t for k, t in state.items() if (new := self.checkpoint_key(k)) is not None}
        return convert_official_formats(state, self.v4.fp8_block)

    def init_buffers(self, device: str | torch.device = "cpu") -> None:
        """The RoPE tables (not in checkpoints), in float32."""
        with torch.device(device):
            self.ropes = nn.ModuleDict(
                {
                    "main": InterleavedRope(self.v4.rope_dim, self.v4.main_rope),
                    "compress": InterleavedRope(self.v4.rope_dim, self.v4.compress_rope),
                }
            )

    @staticmethod
    def check_parallel(cfg: ModelConfig, tp: int, ep: int, mxfp4: bool = False) -> None:
        """The split this layout allows: query heads and `o_groups` over --tp-size (the one K=V
        head, the compressors, the embedding and the head are replicated), routed experts over
        --ep-size, each expert's intermediate dim over the ranks of one expert group."""
        v4 = V4Config.from_model_config(cfg)
        world = max(tp, ep)
        for name, value in (("num_attention_heads", v4.num_heads), ("o_groups", v4.o_groups)):
            if value % tp:
                raise ConfigError(f"--tp-size {tp} does not divide the model's {name} ({value})")
        if v4.num_experts % ep:
            raise ConfigError(f"--ep-size {ep} does not divide n_routed_experts ({v4.num_experts})")
        inter = v4.moe_intermediate_size
        if inter % (world // ep) or (mxfp4 and inter // (world // ep) % 32):
            raise ConfigError(
                f"{world // ep} ranks per expert group cannot split moe_intermediate_size "
                f"({inter}){' in MXFP4 blocks of 32' if mxfp4 else ''}; raise --ep-size"
            )

    @staticmethod
    def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        """Compressed entries (and indexer keys) one more token adds, over all layers, rounded
        up. The sliding window and unfinished compression windows cost a fixed amount per
        request instead (`cache_bytes_per_request`)."""
        v4 = V4Config.from_model_config(cfg)
        size = torch.finfo(dtype).bits / 8
        total = 0.0
        for i, kind in enumerate(v4.layer_types):
            rate = v4.compress_rate(i)
            if rate:
                total += (v4.head_dim + (v4.index_head_dim if kind == CSA else 0)) / rate
        return max(1, math.ceil(total * size))

    @staticmethod
    def cache_bytes_per_request(cfg: ModelConfig, dtype: torch.dtype) -> int:
        """The most a request holds apart from its compressed entries: the window's K=V of
        every layer and, per compressor, raw K/V and gate rows of up to two windows."""
        v4 = V4Config.from_model_config(cfg)
        size = torch.finfo(dtype).bits // 8
        total = v4.num_layers * (v4.sliding_window - 1) * v4.head_dim
        for i, kind in enumerate(v4.layer_types):
            rate = v4.compress_rate(i)
            if kind == CSA:
                total += 2 * rate * 2 * (2 * v4.head_dim + 2 * v4.index_head_dim)
            elif rate:
                total += rate * 2 * v4.head_dim
        return total * size

    def set_moe_backend(self, backend: str) -> None:
        """Routed experts as `mxfp4` (quantised like `specserve quantize mxfp4`) or `torch`
        (dense; FP4 checkpoints are dequantised)."""
        if backend not in MOE_BACKENDS:
            raise ValueError(f"MoE backend must be one of {', '.join(MOE_BACKENDS)}")
        dtype = self.head.weight.dtype
        for layer in self.layers:
            for expert in layer.ffn.experts.values():
                expert.set_backend(backend, dtype)

    def fuse(self) -> None:
        """Nothing to fuse; kept for the engine's interface."""

    def new_state(self) -> SequenceState:
        v4 = self.v4
        rates = [v4.compress_rate(i) for i in range(v4.num_layers)]
        return SequenceState.new(rates, [t == CSA for t in v4.layer_types], v4.sliding_window)

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: V4Context,
        capture: tuple[int, ...] = (),
    ) -> ModelOutput:
        """input_ids, positions [N] of the requests in `ctx`, in order. `capture` numbers layers
        as elsewhere (-1 = embeddings); a captured state is the layer's `hc_mult` residual
        streams flattened, [N, hc_mult * H] (the last layer's feed the MTP layers)."""
        streams = self.embed(input_ids).unsqueeze(1).expand(-1, self.v4.hc_mult, -1)
        kept = {-1: streams.flatten(1)} if -1 in capture else {}
        ropes = self.bind_ropes(positions)
        for i, layer in enumerate(self.layers):
            streams = layer(streams, input_ids, positions, ropes, ctx, i)
            if i in capture:
                kept[i] = streams.flatten(1)
        ctx.finish()
        head = (self.hc_head_fn, self.hc_head_base, self.hc_head_scale)
        hidden = self.norm(hyper_head(streams, *head, self.v4))
        captured = torch.cat([kept[i] for i in capture], dim=-1) if capture else None
        return ModelOutput(hidden=hidden, captured=captured)

    def bind_ropes(self, positions: torch.Tensor) -> dict:
        return {k: (r, *r.cos_sin(positions)) for k, r in self.ropes.items()}

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()
