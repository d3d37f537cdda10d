"""MXFP4 expert-weight memory and CPU matmul time against bf16 / fp32.

    .venv/bin/python benchmarks/mxfp4_memory.py [--experts 64 --out-features 768 --in-features 2048]

Prints bytes and bits per parameter for one MoE layer's expert weights, then the time of
running x [N, in] through every expert with `mxfp4_linear` (TorchMXFP4Kernel: dequantise
per chunk, then matmul) and with a dense fp32 matmul, interleaved in one run, for N = 1, 8.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from specserve.quant.mxfp4 import MXFP4Weight, mxfp4_linear


def interleaved_medians(fns: list[Callable[[], None]], repeats: int) -> list[float]:
    """Median seconds per function, running them in turn so all see the same machine load."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--out-features", type=int, default=768)
    parser.add_argument("--in-features", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    shape = (args.experts, args.out_features, args.in_features)
    bf16 = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    fp32 = bf16.float()
    quantized = [MXFP4Weight.from_dense(w) for w in bf16]
    params = bf16.numel()

    print(f"expert weights: {args.experts} x [{args.out_features}, {args.in_features}]")
    print(f"{'format':<8}{'bytes':>14}{'bits/param':>12}{'vs bf16':>9}")
    for name, nbytes in [
        ("fp32", fp32.nbytes),
        ("bf16", bf16.nbytes),
        ("mxfp4", sum(q.nbytes for q in quantized)),
    ]:
        print(f"{name:<8}{nbytes:>14,}{nbytes * 8 / params:>12.3f}{bf16.nbytes / nbytes:>8.2f}x")

    print(
        f"\nall {args.experts} experts, median of {args.repeats}, {torch.get_num_threads()} threads"
    )
    print(f"{'rows':<6}{'fp32 dense ms':>15}{'mxfp4 ms':>11}{'mxfp4 / fp32':>14}")
    for rows in (1, 8):
        x = torch.randn(rows, args.in_features, generator=g)

        def dense(x: torch.Tensor = x) -> None:
            for w in fp32:
                x @ w.T

        def mxfp4(x: torch.Tensor = x) -> None:
            for q in quantized:
                mxfp4_linear(x, q.blocks, q.scales)

        dense(), mxfp4()  # warm up
        t_dense, t_mxfp4 = interleaved_medians([dense, mxfp4], args.repeats)
        print(f"{rows:<6}{t_dense * 1e3:>15.2f}{t_mxfp4 * 1e3:>11.2f}{t_mxfp4 / t_dense:>13.1f}x")


if __name__ == "__main__":
    main()
