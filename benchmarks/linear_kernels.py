"""MKL `mm` on input-major weights vs oneDNN on packed weights vs the C++ kernels' product on
tiled weights, float32 and bfloat16 tiles, by rows, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/linear_kernels.py [--threads 1] [--weights 8]
        [--rows 1,10,80,512]

`specserve.models.layers.linear` uses the tiled product when `--attention-backend cpp` made a
tiled copy (`tile_for_kernels`), else sends products over `ONEDNN_MIN_ROWS` rows or more to
oneDNN's packed weights and one row to MKL; this prints the three kernels for each of the demo
target's and the 150M model's weight shapes at 1, 10, 80 and 512 rows (a decode step, ten
decoding requests, ten verify windows of 8, a prefill chunk): time per product (the 10th
percentile of the runs, arms alternated in blocks, `--weights` distinct weights per shape taken
in turn: the default 8 of the 150M shapes stay in a large L3, 64 stream from DRAM as a model's
layers do), GFLOP/s and the ratios. The weights are rounded to bfloat16 (values a bfloat16
checkpoint holds), so the kernels' bfloat16 tiles (`narrowest_exact`) hold them exactly and give
the same bits as the float32 tiles, with half the bytes to read.
"""

from __future__ import annotations

import argparse
import time

import torch

from specserve import kernels
from specserve.models.layers import narrowest_exact, tile_weight

SHAPES = {  # (in, out): the fused products of one layer
    "demo qkv": (256, 512),
    "demo gate_up": (256, 1536),
    "demo down": (768, 256),
    "150m qkv": (768, 1536),
    "150m gate_up": (768, 4096),
    "150m down": (2048, 768),
}


def p10(fn, reps: int = 300) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 10]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--weights",
        type=int,
        default=8,
        help="distinct weights per shape, taken in turn (8 of the 150M shapes fit a 480 MB L3; "
        "64 stream from memory, as a model's layers do)",
    )
    ap.add_argument("--rows", default="1,10,80,512")
    args = ap.parse_args()
    nw = args.weights
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    kernels.load()
    print(
        "| weight | rows | MKL µs | oneDNN µs | tiled µs | bf16 tiled µs | MKL GFLOP/s "
        "| oneDNN GFLOP/s | tiled GFLOP/s | bf16 tiled GFLOP/s | oneDNN / MKL speed "
        "| tiled / oneDNN speed | bf16 / float32 tiled speed |"
    )
    print("|---" * 13 + "|")
    for name, (k, n) in SHAPES.items():
        weights = [torch.randn(n, k).bfloat16().float() for _ in range(nw)]
        input_major = [w.t().contiguous() for w in weights]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
        tiled = [tile_weight(w) for w in weights]
        tiled16 = [narrowest_exact(t) for t in tiled]
        assert all(t.dtype == torch.bfloat16 for t in tiled16)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k)
            ref = x @ input_major[0]
            got = torch.ops.mkldnn._linear_pointwise(x, packed[0], None, "none", [], "")
            assert torch.allclose(got, ref, atol=1e-3), "oneDNN and MKL disagree"
            out = torch.empty(rows, n)
            torch.ops.specserve.linear_tiled(out, x, tiled[0])
            assert torch.allclose(out, ref, atol=1e-3), "the tiled product and MKL disagree"
            out16 = torch.empty(rows, n)
            torch.ops.specserve.linear_tiled(out16, x, tiled16[0])
            assert torch.equal(out16, out), "bfloat16 and float32 tiles give different bits"

            def mkl(x=x, ws=input_major):
                return [torch.mm(x, w) for w in ws]

            def onednn(x=x, ps=packed):
                return [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in ps]

            def tiled_product(x=x, ts=tiled, out=out):
                return [torch.ops.specserve.linear_tiled(out, x, t) for t in ts]

            def tiled16_product(x=x, ts=tiled16, out=out16):
                return [torch.ops.specserve.linear_tiled(out, x, t) for t in ts]

            reps = max(5, (300 if rows <= 80 else 20) * 8 // nw)
            t_mkl = t_dnn = t_tile = t_16 = float("inf")
            for _ in range(2):  # A B C D A B C D
                t_mkl = min(t_mkl, p10(mkl, reps) / nw)
                t_dnn = min(t_dnn, p10(onednn, reps) / nw)
                t_tile = min(t_tile, p10(tiled_product, reps) / nw)
                t_16 = min(t_16, p10(tiled16_product, reps) / nw)
            flop = 2 * rows * k * n
            print(
                f"| {name} | {rows} | {t_mkl * 1e6:.0f} | {t_dnn * 1e6:.0f} | "
                f"{t_tile * 1e6:.0f} | {t_16 * 1e6:.0f} | {flop / t_mkl / 1e9:.0f} | "
                f"{flop / t_dnn / 1e9:.0f} | {flop / t_tile / 1e9:.0f} | {flop / t_16 / 1e9:.0f} | "
                f"{t_mkl / t_dnn:.2f}x | {t_dnn / t_tile:.2f}x | {t_tile / t_16:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
