"""The official DeepSeek-V4 checkpoint formats, read at load time.

* FP8: a weight [out, in] in float8 e4m3 with `scale` [ceil(out/b), ceil(in/b)] per b x b block
  (b = `weight_block_size`, 128), the scales in ue8m0 (powers of two). Dequantised at load:
  w = fp8 * scale of its block.
* FP4 experts: a weight [out, in] as int8 [out, in/2], two E2M1 codes per byte with the even
  input in the low nibble, and `scale` [out, in/32] in E8M0. That is byte for byte the OCP MX
  layout of `specserve.quant.mxfp4`, so it becomes `weight_blocks` [out, in/32, 16] and
  `weight_scales` [out, in/32] (uint8 views, no copy, no detour through bf16).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def dequantize_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """weight [out, in] (float8 e4m3), scale [ceil(out/b), ceil(in/b)] -> float32 [out, in]."""
    out_f, in_f = weight.shape
    s = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_f, :in_f]
    return weight.float() * s


def quantize_fp8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for tests: power-of-two (ue8m0) block scales, e4m3 values."""
    out_f, in_f = w.shape
    rows, cols = -(-out_f // block), -(-in_f // block)
    padded = w.new_zeros(rows * block, cols * block)
    padded[:out_f, :in_f] = w
    amax = padded.view(rows, block, cols, block).abs().amax(dim=(1, 3)).clamp(min=1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_f, :in_f]
    return (w / full).to(FP8), scale.to(torch.float8_e8m0fnu)


def fp4_to_mxfp4(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [out, in/2] + E8M0 [out, in/32] -> MXFP4 blocks [out, in/32, 16], scales (uint8)."""
    out_f = weight.shape[0]
    blocks = weight.view(torch.uint8).reshape(out_f, -1, 16)
    return blocks, scale.view(torch.uint8)


def mxfp4_to_fp4(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for tests: MXFP4 blocks/scales -> the official int8 / E8M0 tensors."""
    return blocks.reshape(blocks.shape[0], -1).view(torch.int8), scales.view(torch.float8_e8m0fnu)
