"""MXFP4 packing, rounding, error and matmul, checked against hand-computed values and theory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from specserve.quant.mxfp4 import (
    MXFP4Weight,
    TorchMXFP4Kernel,
    dequantize_mxfp4,
    mxfp4_linear,
    quantize_mxfp4,
)


def e2m1_decode(code: int) -> float:
    """E2M1 from its bits (sign | 2-bit exponent, bias 1 | 1-bit mantissa), not via a table."""
    sign, exp, man = code >> 3, (code >> 1) & 3, code & 1
    magnitude = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
    return -magnitude if sign else magnitude


def pack(codes: list[int]) -> list[int]:
    return [codes[i] | (codes[i + 1] << 4) for i in range(0, len(codes), 2)]


def test_decode_table_is_the_e2m1_value_set() -> None:
    assert sorted({abs(e2m1_decode(c)) for c in range(16)}) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("exp", [-127, -100, -3, -1, 0, 1, 5, 64, 125])
def test_every_code_and_sign_round_trips_exactly(exp: int) -> None:
    # Contains +-6, so the block's shared exponent is `exp`.
    codes = list(range(16)) + list(range(15, -1, -1))
    values = torch.tensor([math.ldexp(e2m1_decode(c), exp) for c in codes], dtype=torch.float32)
    blocks, scales = quantize_mxfp4(values)
    assert blocks.tolist() == [pack(codes)]
    assert scales.tolist() == [exp + 127]
    back = dequantize_mxfp4(blocks, scales)
    assert torch.equal(back, values)
    assert torch.equal(torch.signbit(back), torch.signbit(values))  # -0.0 stays -0.0


@pytest.mark.parametrize("scale_byte", [0, 1, 100, 126, 127, 128, 200])
def test_dequantize_every_byte(scale_byte: int) -> None:
    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 16)  # 16 blocks of 16 bytes
    scales = torch.full((16,), scale_byte, dtype=torch.uint8)
    expected = []
    for byte in range(256):  # low nibble is the even element
        for code in (byte & 0xF, byte >> 4):
            expected.append(math.ldexp(e2m1_decode(code), scale_byte - 127))
    assert torch.equal(dequantize_mxfp4(blocks, scales), torch.tensor(expected))


def test_hand_computed_bytes_ties_and_saturation() -> None:
    block1 = [2.0, -1.0, 12.0, 0.0, 3.0, -8.0, 1.0, 5.0]  # max 12: exponent 3 - 2 = 1
    block2 = [1.5, 1.25, 0.0625, 0.1875, 0.3125, 0.4375, 0.625, 0.875, -0.0625, -0.1875]  # 0 - 2
    block3 = [7.5, -7.0, 4.0]  # max 7.5: exponent 2 - 2 = 0
    w = torch.tensor([b + [0.0] * (32 - len(b)) for b in (block1, block2, block3)]).reshape(1, 96)

    blocks, scales = quantize_mxfp4(w)

    assert blocks.shape == (1, 3, 16) and scales.shape == (1, 3)
    assert scales.tolist() == [[0x80, 0x7D, 0x7F]]  # 127 + 1, 127 - 2, 127 + 0
    # block1 / 2 = 1, -0.5 | 6, 0 | 1.5, -4 | 0.5, 2.5 (tie -> 2)
    # block2 * 4 = 6, 5 (tie -> 4) | .25 (tie -> 0), .75 (tie -> 1) | 1.25 (-> 1), 1.75 (-> 2)
    #            | 2.5 (-> 2), 3.5 (-> 4) | -.25 (-> -0), -.75 (-> -1)
    # block3     = 7.5 (saturates to 6), -7 (-> -6) | 4, 0
    expected = [
        [0x92, 0x07, 0xE3, 0x41] + [0] * 12,
        [0x67, 0x20, 0x42, 0x64, 0xA8] + [0] * 11,
        [0xF7, 0x06] + [0] * 14,
    ]
    assert blocks.tolist() == [expected]
    back = dequantize_mxfp4(blocks, scales).reshape(3, 32)
    assert back[0, :8].tolist() == [2.0, -1.0, 12.0, 0.0, 3.0, -8.0, 1.0, 4.0]
    assert back[1, :10].tolist() == [1.5, 1.0, 0.0, 0.25, 0.25, 0.5, 0.5, 1.0, -0.0, -0.25]
    assert back[2, :3].tolist() == [6.0, -6.0, 4.0]


def test_zero_and_non_finite_blocks() -> None:
    w = torch.zeros(4, 32)
    w[1, 3], w[2, 0], w[3, 31] = float("nan"), float("inf"), 1.0
    blocks, scales = quantize_mxfp4(w)
    assert scales.tolist() == [[0], [0xFF], [0xFF], [125]]
    assert blocks[:3].eq(0).all()
    back = dequantize_mxfp4(blocks, scales)
    assert back[1:3].isnan().all() and torch.equal(back[[0, 3]], w[[0, 3]])


def test_bf16_input_matches_fp32_input() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for got, want in zip(quantize_mxfp4(w), quantize_mxfp4(w.float()), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(4, 48), (31,), (2, 0), ()])
def test_rejects_k_not_multiple_of_32(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(shape))


def test_rejects_integer_input() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        quantize_mxfp4(torch.zeros(2, 32, dtype=torch.int32))


def gaussian_relative_rms_theory(block: int = 32) -> float:
    """sqrt(E|x - q(x)|^2 / E|x|^2) for iid N(0, 1) weights, by numerical integration.

    Per block, M = max|x_i| sets the exponent s = floor(log2 M) - 2. M has density
    n * 2phi(M) * F(M)^(n-1) (F the CDF of |x|), and given M the other n - 1 values are iid
    |x| conditioned on |x| < M. So E[block squared error] =
    int n 2phi(M) F(M)^(n-2) [F(M) e(M) + (n - 1) int_0^M e(x) 2phi(x) dx] dM, with
    e(x) = (x - 2^s Q(x / 2^s))^2 and Q the nearest E2M1 magnitude (6 is the largest, so
    saturation is included; ties have probability zero).
    """
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    h = 1e-4
    x = np.arange(0, 10 + h / 2, h)
    pdf = 2 * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = np.array([math.erf(v / math.sqrt(2)) for v in x])
    exps = np.floor(np.log2(np.maximum(x, 1e-300))) - 2
    err_at_m = np.zeros_like(x)
    inner = np.zeros_like(x)  # int_0^M e(x; s(M)) 2phi(x) dx
    for s in np.unique(exps[x > 1e-3]):
        step = 2.0**s
        e = (x - step * grid[np.abs(x[:, None] / step - grid).argmin(axis=1)]) ** 2
        f = e * pdf
        cum = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) * h / 2)])
        err_at_m[exps == s], inner[exps == s] = e[exps == s], cum[exps == s]
    g = block * pdf * cdf ** (block - 2) * (cdf * err_at_m + (block - 1) * inner)
    return math.sqrt(np.sum((g[1:] + g[:-1]) * h / 2) / block)


def test_gaussian_error_matches_theory() -> None:
    theory = gaussian_relative_rms_theory()
    assert 0.10 < theory < 0.13  # ~0.1150; guards the integration itself
    w = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(1))
    blocks, scales = quantize_mxfp4(w)
    err = dequantize_mxfp4(blocks, scales) - w
    measured = math.sqrt(err.pow(2).sum().item() / w.pow(2).sum().item())
    # 131072 blocks: the spread over seeds is ~0.05% of the value, so the band is ~5 sigma.
    assert measured == pytest.approx(theory, rel=2.5e-3)
    # Deterministic bound: |error| <= half the widest E2M1 gap (4 -> 6) or the saturation
    # loss (< 8 - 6), i.e. < 2 * 2^s for the block's exponent s.
    step = (2.0 ** (scales.double() - 127)).repeat_interleave(32, dim=-1)
    assert (err.abs() < 2 * step).all()


def test_linear_matches_dense_matmul_across_chunks() -> None:
    g = torch.Generator().manual_seed(2)
    w, x, bias = torch.randn(37, 96, generator=g), torch.randn(5, 96, generator=g), torch.randn(37)
    blocks, scales = quantize_mxfp4(w)
    dense = dequantize_mxfp4(blocks, scales)
    kernel = TorchMXFP4Kernel(max_chunk_elems=4 * 96)  # 4 rows per chunk, ragged last chunk
    torch.testing.assert_close(mxfp4_linear(x, blocks, scales, bias, kernel), x @ dense.T + bias)
    torch.testing.assert_close(mxfp4_linear(x, blocks, scales), x @ dense.T)
    x3 = x.reshape(5, 1, 96).expand(5, 2, 96)
    torch.testing.assert_close(mxfp4_linear(x3, blocks, scales, kernel=kernel), x3 @ dense.T)
    xb = x.to(torch.bfloat16)
    got = mxfp4_linear(xb, blocks, scales, kernel=kernel)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, xb @ dequantize_mxfp4(blocks, scales, torch.bfloat16).T)


def test_linear_rejects_mismatched_shapes() -> None:
    blocks, scales = quantize_mxfp4(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\]"):
        mxfp4_linear(torch.randn(2, 32), blocks, scales)
    with pytest.raises(ValueError, match="bias"):
        mxfp4_linear(torch.randn(2, 64), blocks, scales, torch.zeros(7))
    with pytest.raises(ValueError, match="blocks must be"):
        mxfp4_linear(torch.randn(2, 64), blocks, scales[:, :1])


def test_weight_holder() -> None:
    w = torch.randn(3, 48, 64)
    q = MXFP4Weight.from_dense(w)
    assert q.shape == (3, 48, 64)
    assert q.nbytes == 3 * 48 * (64 // 2 + 64 // 32)
    assert q.nbytes * 8 / w.numel() == 4.25
    assert torch.equal(q.dequantize(), dequantize_mxfp4(*quantize_mxfp4(w)))
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16
    x = torch.randn(2, 64)
    torch.testing.assert_close(MXFP4Weight.from_dense(w[0]).linear(x), x @ q.dequantize()[0].T)
    with pytest.raises(ValueError, match="uint8"):
        MXFP4Weight(q.blocks.float(), q.scales)
