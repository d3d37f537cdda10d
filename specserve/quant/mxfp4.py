"""MXFP4 (OCP Microscaling v1.0) packing, unpacking and matmul for weights.

Format, matching gpt-oss checkpoints and transformers' `convert_moe_packed_tensors`:

* Elements are FP4 E2M1 codes: bit 3 is the sign, bits 0-2 index
  (0, 0.5, 1, 1.5, 2, 3, 4, 6); `FP4_VALUES[code]` is the value.
* Every 32 consecutive elements along the last (input / reduction) dim share one
  E8M0 scale byte `b`: the scale is 2**(b - 127); b = 0xFF means NaN.
* Two codes per byte, the even element in the low nibble.

So a weight [..., K] is stored as `blocks` uint8 [..., K // 32, 16] and `scales`
uint8 [..., K // 32]: 4.25 bits per parameter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK_SIZE = 32  # elements sharing one scale
BYTES_PER_BLOCK = BLOCK_SIZE // 2
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E2M1_EMAX = 2  # exponent of the largest E2M1 magnitude, 6 = 1.5 * 2**2

FP4_VALUES: tuple[float, ...] = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip

# Midpoints between consecutive E2M1 magnitudes; midpoint i lies between codes i and i + 1.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_QUANTIZE_CHUNK_ELEMS = 1 << 22  # bounds the int/float temporaries of quantize_mxfp4


def quantize_mxfp4(w: Tensor) -> tuple[Tensor, Tensor]:
    """Quantise a float weight [..., K] to (blocks uint8 [..., K//32, 16], scales uint8 [..., K//32]).

    OCP rule per block of 32: shared exponent = floor(log2(max|x|)) - 2, clamped to the
    E8M0 range [-127, 127]; each x / 2**exp is rounded to the nearest E2M1 value, ties to
    the even code, and magnitudes above 6 saturate to 6. The sign is kept, so -0.0 and
    small negatives become code 8 (-0). An all-zero block gets scale byte 0; a block with
    any NaN or Inf gets scale byte 0xFF (NaN) and zero codes.
    """
    if not w.is_floating_point():
        raise ValueError(f"MXFP4 quantisation needs a floating-point tensor, got {w.dtype}")
    if w.ndim == 0 or w.shape[-1] == 0 or w.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"MXFP4 needs the last dim to be a positive multiple of {BLOCK_SIZE}, "
            f"got shape {tuple(w.shape)}"
        )
    lead, k = w.shape[:-1], w.shape[-1]
    rows = w.reshape(-1, k)
    step = max(1, _QUANTIZE_CHUNK_ELEMS // k)
    # range(max(R, 1)) so that an empty weight [0, K] still yields one (empty) chunk.
    parts = [_quantize_rows(rows[r : r + step]) for r in range(0, max(rows.shape[0], 1), step)]
    blocks, scales = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    g = k // BLOCK_SIZE
    return blocks.reshape(*lead, g, BYTES_PER_BLOCK), scales.reshape(*lead, g)


def _quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """[R, K] float -> (blocks uint8 [R, K//32, 16], scales uint8 [R, K//32])."""
    x = w.float().reshape(w.shape[0], w.shape[1] // BLOCK_SIZE, BLOCK_SIZE)
    finite = torch.isfinite(x).all(dim=-1)  # [R, G]
    x = torch.where(finite.unsqueeze(-1), x, torch.zeros_like(x))
    amax = x.abs().amax(dim=-1)
    _, exp = torch.frexp(amax)  # amax = m * 2**exp with m in [0.5, 1): floor(log2 amax) = exp - 1
    shared = (exp - 1 - E2M1_EMAX).clamp(-E8M0_BIAS, E8M0_BIAS)
    shared = torch.where(amax > 0, shared, -E8M0_BIAS)
    scale_bytes = (shared + E8M0_BIAS).to(torch.uint8)
    # Division by an exact power of two is exact whenever the quotient is representable.
    scaled = x.abs() / _e8m0_to_float(scale_bytes).unsqueeze(-1)
    codes = _round_to_e2m1(scaled) | (torch.signbit(x).to(torch.uint8) << 3)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scale_bytes = torch.where(finite, scale_bytes, E8M0_NAN)
    return blocks, scale_bytes


def _round_to_e2m1(v: Tensor) -> Tensor:
    """Magnitudes >= 0 -> E2M1 magnitude codes 0..7 (uint8), nearest with ties to even, saturating."""
    mid = torch.tensor(_MIDPOINTS, dtype=v.dtype, device=v.device)
    below = torch.bucketize(v, mid, out_int32=True)  # midpoints strictly below v
    at_or_below = torch.bucketize(v, mid, out_int32=True, right=True)
    # On a tie (v equals midpoint `below`) the odd neighbour `below` loses to `below + 1`.
    tie_up = (at_or_below > below) & (below % 2 == 1)
    return (below + tie_up.to(torch.int32)).to(torch.uint8)


def _e8m0_to_float(scales: Tensor) -> Tensor:
    """E8M0 bytes [...] -> float32 2**(b - 127) [...], exact; 0xFF -> NaN.

    Built from the float32 bit pattern: exponent field b for 1 <= b <= 254, the subnormal
    2**-127 (mantissa bit 22) for b = 0, and a quiet NaN for 0xFF.
    """
    b = scales.to(torch.int32)
    bits = torch.where(b == 0, 1 << 22, b << 23)
    bits = torch.where(b == E8M0_NAN, 0x7FC00000, bits)
    return bits.view(torch.float32)


def _pair_lut(device: torch.device) -> Tensor:
    """[256, 2] float32: byte -> (value of low nibble, value of high nibble)."""
    values = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack([values[byte & 0x0F], values[byte >> 4]], dim=-1)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(blocks uint8 [..., G, 16], scales uint8 [..., G]) -> weight [..., G * 32] in `dtype`."""
    _check_packed(blocks, scales)
    return _dequantize(blocks, scales, _pair_lut(blocks.device)).to(dtype)


def _dequantize(blocks: Tensor, scales: Tensor, pair_lut: Tensor) -> Tensor:
    """blocks [..., G, 16], scales [..., G] -> float32 [..., G * 32]."""
    # index_select with int32 indices is ~3x faster on CPU than advanced indexing with int64.
    values = pair_lut.index_select(0, blocks.reshape(-1).int()).view(*scales.shape, BLOCK_SIZE)
    return values.mul_(_e8m0_to_float(scales).unsqueeze(-1)).flatten(-2)


def _check_packed(blocks: Tensor, scales: Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks must be [..., G, {BYTES_PER_BLOCK}] and scales [..., G], "
            f"got {tuple(blocks.shape)} and {tuple(scales.shape)}"
        )


class MXFP4Kernel(ABC):
    """Backend for y = x @ W.T + bias with W stored as MXFP4.

    Contract: x [..., K] float (fp32/bf16/fp16); blocks uint8 [out, K//32, 16]; scales
    uint8 [out, K//32]; bias [out] or None. Returns [..., out] in x.dtype, equal (up to
    matmul rounding) to x @ dequantize_mxfp4(blocks, scales, x.dtype).T + bias. All
    tensors are on one device; a kernel never mutates its inputs.
    """

    @abstractmethod
    def linear(self, x: Tensor, blocks: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
        """See the class docstring."""


@dataclass(frozen=True)
class TorchMXFP4Kernel(MXFP4Kernel):
    """Portable kernel: dequantise `max_chunk_elems` weights at a time, then a dense matmul.

    Peak extra memory is one chunk of W in x.dtype (4 MiB at the fp32 default).
    """

    max_chunk_elems: int = 1 << 20

    def __post_init__(self) -> None:
        if self.max_chunk_elems < 1:
            raise ValueError(f"max_chunk_elems must be >= 1, got {self.max_chunk_elems}")

    def linear(self, x: Tensor, blocks: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
        out_features, k = _check_linear(x, blocks, scales, bias)
        x2 = x.reshape(-1, k)
        y = x2.new_empty(x2.shape[0], out_features)
        lut = _pair_lut(blocks.device)
        step = max(1, self.max_chunk_elems // k)
        for r0 in range(0, out_features, step):
            w = _dequantize(blocks[r0 : r0 + step], scales[r0 : r0 + step], lut).to(x.dtype)
            y[:, r0 : r0 + step] = x2 @ w.T
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], out_features)


def _check_linear(
    x: Tensor, blocks: Tensor, scales: Tensor, bias: Tensor | None
) -> tuple[int, int]:
    """Validate shapes for MXFP4Kernel.linear; returns (out_features, K)."""
    _check_packed(blocks, scales)
    if blocks.ndim != 3:
        raise ValueError(f"MXFP4 linear blocks must be [out, K//32, 16], got {tuple(blocks.shape)}")
    out_features, k = blocks.shape[0], blocks.shape[1] * BLOCK_SIZE
    if x.ndim == 0 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., {k}] for this weight, got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [{out_features}], got {tuple(bias.shape)}")
    return out_features, k


def kernel_for(device: torch.device) -> MXFP4Kernel:
    """The MXFP4 kernel to use on `device`; the place to pick a GPU kernel once one exists."""
    return TorchMXFP4Kernel()


def mxfp4_linear(
    x: Tensor,
    blocks: Tensor,
    scales: Tensor,
    bias: Tensor | None = None,
    kernel: MXFP4Kernel | None = None,
) -> Tensor:
    """x [..., K] @ W.T (+ bias [out]) -> [..., out], W [out, K] given as MXFP4 blocks/scales."""
    return (kernel or kernel_for(x.device)).linear(x, blocks, scales, bias)


@dataclass(frozen=True, eq=False)
class MXFP4Weight:
    """One MXFP4 weight: blocks uint8 [..., K//32, 16] and scales uint8 [..., K//32].

    `shape` is the logical weight shape [..., K]; for a linear layer [out, K].
    """

    blocks: Tensor
    scales: Tensor

    def __post_init__(self) -> None:
        _check_packed(self.blocks, self.scales)

    @classmethod
    def from_dense(cls, w: Tensor) -> MXFP4Weight:
        return cls(*quantize_mxfp4(w))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.scales.shape[:-1], self.scales.shape[-1] * BLOCK_SIZE))

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes + self.scales.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_mxfp4(self.blocks, self.scales, dtype)

    def linear(
        self, x: Tensor, bias: Tensor | None = None, kernel: MXFP4Kernel | None = None
    ) -> Tensor:
        """x [..., K] -> [..., out] for a weight of shape [out, K]."""
        return mxfp4_linear(x, self.blocks, self.scales, bias, kernel)

    def to(self, device: torch.device | str) -> MXFP4Weight:
        return MXFP4Weight(self.blocks.to(device), self.scales.to(device))
