"""Qwen3-MoE: the Qwen3 skeleton with a sparse mixture-of-experts MLP in the sparse layers.

A layer is sparse when num_experts > 0, it is not in `mlp_only_layers` and
(layer + 1) % decoder_sparse_step == 0 (transformers' rule); the others keep the dense MLP.
Router: softmax over experts in float32, top-k, renormalised when `norm_topk_prob`; each token's
output is the weighted sum of its k experts (SwiGLU MLPs). Weight names are the checkpoint's:
`mlp.gate.weight` (router) and `mlp.experts.{e}.{gate,up,down}_proj.weight`, or their MXFP4
`weight_blocks` / `weight_scales` pairs (`specserve quantize mxfp4`).

Experts run on one of two backends: `torch` (dense weights) or `mxfp4` (4.25-bit weights,
`specserve.quant.mxfp4`, dequantised per call). Under expert parallelism a rank holds only its
experts (a ModuleDict keyed by the global expert id) and the combine is an all-reduce.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from specserve.config import ModelConfig
from specserve.models.layers import GatedMLP, Linear, linear
from specserve.models.parallel import Parallel, gated_mlp, mark
from specserve.models.qwen3 import CausalLM
from specserve.quant.mxfp4 import MXFP4Weight, mxfp4_linear

MOE_BACKENDS = ("torch", "mxfp4")
_EXPERT = re.compile(r".*\.mlp\.experts\.(\d+)\..*")


def is_mxfp4_checkpoint(cfg: ModelConfig) -> bool:
    return (cfg.raw.get("quantization_config") or {}).get("quant_method") == "mxfp4"


def make_mlp(cfg: ModelConfig, layer_idx: int, par: Parallel | None = None) -> nn.Module:
    """The MLP of layer `layer_idx` for any config: sparse MoE where the config says so, dense
    SwiGLU elsewhere. Drafters with MoE fields in their config build their MLPs with this too."""
    if cfg.is_sparse_layer(layer_idx):
        return SparseMoeBlock(cfg, par)
    return gated_mlp(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, par)


class MXFP4Linear(nn.Module):
    """A bias-free linear whose weight [out, K] is stored as MXFP4 (uint8 blocks and scales)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer(
            "weight_blocks", torch.zeros(out_features, in_features // 32, 16, dtype=torch.uint8)
        )
        self.register_buffer(
            "weight_scales", torch.zeros(out_features, in_features // 32, dtype=torch.uint8)
        )

    @classmethod
    def from_weight(cls, w: MXFP4Weight) -> MXFP4Linear:
        out_f, k = w.shape
        layer = cls(k, out_f)
        layer.weight_blocks, layer.weight_scales = w.blocks, w.scales
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mxfp4_linear(x, self.weight_blocks, self.weight_scales)


class MXFP4MLP(nn.Module):
    """SwiGLU expert with MXFP4 weights; gate and up share one packed tensor after `fuse`."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = MXFP4Linear(hidden, intermediate)
        self.up_proj = MXFP4Linear(hidden, intermediate)
        self.down_proj = MXFP4Linear(intermediate, hidden)
        self.intermediate = intermediate
        self._fused = False

    @classmethod
    def from_dense(cls, mlp: GatedMLP) -> MXFP4MLP:
        """Quantise a dense expert (as `specserve quantize mxfp4` does, bit for bit)."""
        new = cls(mlp.gate_proj.weight.shape[1], mlp.intermediate)
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = MXFP4Weight.from_dense(getattr(mlp, name).weight.detach())
            setattr(new, name, MXFP4Linear.from_weight(w))
        return new

    def to_dense(self, dtype: torch.dtype) -> GatedMLP:
        mlp = GatedMLP(self.down_proj.weight_blocks.shape[0], self.intermediate)
        for name in ("gate_proj", "up_proj", "down_proj"):
            p = getattr(self, name)
            w = MXFP4Weight(p.weight_blocks, p.weight_scales).dequantize(dtype)
            getattr(mlp, name).weight = nn.Parameter(w, requires_grad=False)
        return mlp

    def fuse(self) -> None:
        """Gate and up in one packed tensor; the two buffers become views of it (no copy kept)."""
        g, u = self.gate_proj, self.up_proj
        blocks = torch.cat([g.weight_blocks, u.weight_blocks])
        scales = torch.cat([g.weight_scales, u.weight_scales])
        n = self.intermediate
        g.weight_blocks, u.weight_blocks = blocks[:n], blocks[n:]
        g.weight_scales, u.weight_scales = scales[:n], scales[n:]
        self._gate_up = (blocks, scales)
        self._fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused:
            gate, up = mxfp4_linear(x, *self._gate_up).split(self.intermediate, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class SparseMoeBlock(nn.Module):
    """Router + this rank's experts. forward: x [N, H] -> [N, H] (all experts combined)."""

    def __init__(self, cfg: ModelConfig, par: Parallel | None = None) -> None:
        super().__init__()
        par = par or Parallel.single()
        e, self.top_k, self.norm_topk = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.num_experts, self.par = e, par
        per = e // par.ep_size
        self.local = range(par.ep_rank * per, (par.ep_rank + 1) * per)
        self.gate = Linear(cfg.hidden_size, e)
        inter = cfg.moe_intermediate_size // par.expert_split
        mxfp4 = is_mxfp4_checkpoint(cfg)
        self.experts = nn.ModuleDict()
        for i in self.local:
            mlp = MXFP4MLP(cfg.hidden_size, inter) if mxfp4 else GatedMLP(cfg.hidden_size, inter)
            self._mark_expert(mlp)
            self.experts[str(i)] = mlp

    def _mark_expert(self, mlp: nn.Module) -> None:
        r, n = self.par.expert_split_rank, self.par.expert_split
        mark(mlp.gate_proj, 0, r, n)
        mark(mlp.up_proj, 0, r, n)
        mark(mlp.down_proj, 1, r, n)

    def set_backend(self, backend: str, dtype: torch.dtype) -> None:
        """Convert every local expert to `backend` (quantise dense ones, dequantise MXFP4 ones)."""
        for key, mlp in list(self.experts.items()):
            if backend == "mxfp4" and isinstance(mlp, GatedMLP):
                self.experts[key] = MXFP4MLP.from_dense(mlp)
            elif backend == "torch" and isinstance(mlp, MXFP4MLP):
                self.experts[key] = mlp.to_dense(dtype)

    def fuse(self) -> None:
        for mlp in self.experts.values():
            if isinstance(mlp, GatedMLP):
                mlp.fuse(share_storage=True)
            else:
                mlp.fuse()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k] in x.dtype, expert ids [N, k])."""
        probs = torch.softmax(linear(x, self.gate.weight).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] (a flattened batch, or a drafter's [B, K, H] blocks) -> [..., H]."""
        if x.dim() != 2:
            return self.forward(x.reshape(-1, x.shape[-1])).view(x.shape)
        weights, ids = self.route(x)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        # One row per (token, slot); rows of other ranks' experts stay zero. (Row assignment,
        # not index_add_: on CPU the latter's parallel path costs milliseconds per call.)
        ys = x.new_zeros(flat.shape[0], x.shape[-1])
        for e in self.local:
            if counts[e]:
                pairs = order[starts[e] : starts[e + 1]]
                ys[pairs] = self.experts[str(e)](x[pairs // self.top_k])
        out = (ys.view(*ids.shape, -1) * weights.unsqueeze(-1)).sum(dim=1)
        return self.par.world_all_reduce(out)


def set_moe_backend(model: nn.Module, backend: str) -> int:
    """Convert the experts of every MoE block in `model` to `backend`; returns blocks touched."""
    if backend not in MOE_BACKENDS:
        raise ValueError(f"MoE backend must be one of {', '.join(MOE_BACKENDS)}, got {backend!r}")
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for b in blocks:
        b.set_backend(backend, dtype)
    return len(blocks)


def expert_bytes(model: nn.Module) -> int:
    """Bytes held by expert weights (parameters and MXFP4 buffers), views counted once."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, SparseMoeBlock):
            for t in [*m.experts.parameters(), *m.experts.buffers()]:
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
    return total


class Qwen3MoeForCausalLM(CausalLM):
    make_mlp = staticmethod(make_mlp)

    def fuse(self) -> None:
        super().fuse()
        for layer in self.model.layers:
            if isinstance(layer.mlp, SparseMoeBlock):
                layer.mlp.fuse()

    def holds_weight(self, name: str) -> bool:
        """False for another expert-parallel rank's expert weights (the loader skips them)."""
        m = _EXPERT.fullmatch(name)
        if m is None:
            return True
        layer = self.model.layers[int(name.split(".")[2])].mlp
        return int(m.group(1)) in layer.local
