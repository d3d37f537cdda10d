"""Building blocks shared by every model: linear, RMSNorm, rotary embedding, gated MLP.

All matrix products go through `linear()`, so the choice of kernel form lives in one place.
At inference, `to_input_major` stores weights input-major ([in, out] contiguous; the `weight`
parameter stays an [out, in] view of it, so names and shapes are unchanged): on this CPU's MKL
`x @ W_t` streams a large weight at ~22 GB/s for one row where `F.linear` reaches ~12 GB/s
(benchmarks/engine_decode.py measures the effect end to end). On the CPU in float32 it also
keeps a oneDNN-packed copy of each inference weight (`pack_for_rows`) for products over several
rows (batched decode, verify windows, prefill), where oneDNN runs 1.2-2.5x MKL's `mm` here
(AVX-512 kernels; MKL takes its AVX2 path on this AMD CPU); one row stays on MKL, which is
faster there (`benchmarks/linear_kernels.py`). The copy doubles the dense weights' memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_MIN_ROWS = 2  # products over at least this many rows use the oneDNN-packed weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias for x [N, in], weight [out, in] -> [N, out]."""
    tiled = getattr(weight, "tiled", None)  # kept by `tile_for_kernels`
    if tiled is not None and x.dtype == torch.float32:
        out = x.new_empty(x.shape[0], weight.shape[0])
        torch.ops.specserve.linear_tiled(out, x.contiguous(), tiled)
        return out if bias is None else out.add_(bias)
    packed = getattr(weight, "onednn_packed", None)
    if packed is not None and x.shape[0] >= ONEDNN_MIN_ROWS and x.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    w_t = getattr(weight, "input_major", None)  # [in, out], kept by `to_input_major`
    if w_t is None and weight.stride(0) == 1 and weight.dim() == 2:  # input-major storage
        w_t = weight.t()
    if w_t is not None:
        return torch.addmm(bias, x, w_t) if bias is not None else torch.mm(x, w_t)
    return F.linear(x, weight, bias)


def to_input_major(*weights: torch.Tensor, pack: bool = True) -> torch.Tensor:
    """Store `weights` ([out_i, in] each) in one input-major block [in, sum out_i] and make each
    an [out_i, in] view of it. Returns the whole block as an [sum out_i, in] view (a fused
    weight for one product over all of them), packed for several rows (`pack_for_rows`) unless
    `pack` is False; a single weight is packed itself."""
    block = torch.cat([w.detach().t() for w in weights], dim=1).contiguous()
    start = 0
    for w in weights:
        w.data = block[:, start : start + w.shape[0]].t()
        start += w.shape[0]
    fused = weights[0] if len(weights) == 1 else block.t()
    fused.input_major = block  # type: ignore[attr-defined]  # no `.t()` per product
    if pack:
        pack_for_rows(fused)
    return fused


def pack_for_rows(weight: torch.Tensor) -> None:
    """Keep a oneDNN-packed copy of an inference weight [out, in] (CPU, float32) that `linear`
    uses for products over `ONEDNN_MIN_ROWS` rows or more. Elsewhere a no-op."""
    if (
        weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or not torch.backends.mkldnn.is_available()
    ):
        return
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 16)
    weight.onednn_packed = packed  # type: ignore[attr-defined]


TILE_COLUMNS = 64  # output columns per tile (kCols in specserve/kernels/dense_step.cpp)


def tile_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [ceil(out / 64), in, 64]: the layout of the C++ kernels' products, where the
    64 output columns of a tile are one contiguous stream (zero-padded past `out`)."""
    out_features, in_features = weight.shape
    padded = F.pad(weight.detach().contiguous(), (0, 0, 0, -out_features % TILE_COLUMNS))
    return padded.view(-1, TILE_COLUMNS, in_features).transpose(1, 2).contiguous()


def narrowest_exact(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in bfloat16 or float16 where every value survives the round trip, else itself.
    A checkpoint saved in 16 bits (Qwen3 and DeepSeek ship bfloat16; the demo target float16)
    and loaded in float32 holds only such values: the kernels widen them back exactly, so a
    product gives the same bits as from the float32 copy and reads half the bytes."""
    for dtype in (torch.bfloat16, torch.float16):
        narrow = weight.to(dtype)
        if torch.equal(narrow.to(weight.dtype), weight):
            return narrow
    return weight


def tile_for_kernels(weight: torch.Tensor) -> torch.Tensor | None:
    """Keep a tiled copy of an inference weight (CPU, float32) for `linear()` and the fused
    decode step, in place of its oneDNN-packed copy: the kernels' product is at least as fast
    as oneDNN from 1 to 512 rows here and 1.2-1.9x MKL's one-row product
    (`benchmarks/linear_kernels.py`). The copy is 16-bit where that is exact
    (`narrowest_exact`). Returns the tiled weight, or None where it does not apply. Needs
    `specserve.kernels.load()`."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    tiled = getattr(weight, "tiled", None)
    if tiled is None:
        tiled = narrowest_exact(tile_weight(weight))
        weight.tiled = tiled  # type: ignore[attr-defined]
    if hasattr(weight, "onednn_packed"):
        del weight.onednn_packed  # type: ignore[attr-defined]
    return tiled


class Linear(nn.Module):
    """A linear layer in Hugging Face weight layout ([out, in]) that calls `linear()`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            shape = x.shape[:-1]
            return linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias).view(*shape, -1)
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 like the reference implementation, cast back before the scale.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


def _inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv.float()
    if kind == "linear":
        return (inv / float(scaling["factor"])).float()
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).float()
    raise ValueError(f"rope_scaling type {kind!r} is not supported")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate_half), with a cos/sin table indexed by position."""

    cos: torch.Tensor  # [max_positions, head_dim / 2] (buffers)
    sin: torch.Tensor

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None
    ) -> None:
        super().__init__()
        inv = _inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N]; q [N, h, d], k [N, kv, d] -> rotated q, k."""
        rotated = self.bind(positions)(torch.cat([q, k], dim=1))
        return rotated.split([q.shape[1], k.shape[1]], dim=1)

    def bind(self, positions: torch.Tensor) -> BoundRotary:
        """The cos/sin rows of `positions`, looked up once for all layers of one forward."""
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return BoundRotary(torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1))


class BoundRotary:
    """A rotary embedding for fixed positions: x [N, heads, d] -> x rotated (rotate_half form
    x * cos + roll(x, d / 2) * [-sin, sin], computed in float32)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin  # [N, 1, d] each

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = torch.addcmul(xf * self.cos, xf.roll(xf.shape[-1] // 2, dims=-1), self.sin)
        return out if out.dtype == x.dtype else out.to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); gate and up in one product."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias)
        self.up_proj = Linear(hidden, intermediate, bias)
        self.down_proj = Linear(intermediate, hidden, bias)
        self.intermediate = intermediate
        self._fused: torch.Tensor | None = None
        self.shares_storage = False  # see `fuse`

    def fuse(self, share_storage: bool = False) -> None:
        """Gate and up weights in one input-major block for inference (one product instead of
        two, in the faster form for wide outputs). With `share_storage` the two weights are
        re-pointed into that block, so no second copy is kept (MoE experts: most of a model)."""
        self.shares_storage = share_storage
        if self.gate_proj.bias is None:
            weights = (self.gate_proj.weight, self.up_proj.weight)
            self._fused = to_input_major(*weights, pack=not share_storage)
            if share_storage:
                n = self.intermediate
                self.gate_proj.weight.data = self._fused[:n]
                self.up_proj.weight.data = self._fused[n:]
            else:
                pack_for_rows(self.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            gate, up = linear(x, self._fused).split(self.intermediate, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)
