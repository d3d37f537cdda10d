"""The paged-attention kernel against its floor and the PyTorch backend, one layer, side by side.

    .venv/bin/python benchmarks/paged_attention.py [--threads 1] [--reps 10]
        [--heads 4 --kv-heads 2] [--batches 1,10] [--contexts 512,1024,2048] [--no-prefill]

Shapes are the demo target's by default (4 query heads, 2 KV heads; the 150M model's are 12
and 4), head size 64, pages of 16: batch {1, 10} x context {512, 1024, 2048} x {decode,
verify 8}, each request's pages laid out
`contiguous` (one run, as after a prefill), `interleaved` (taken in turns, as when requests
decoding together each take their next page) or `random` (a fragmented pool), in a pool of
20,000 pages; then one 2,048-token context's prefill chunk of 512 (after 1,536 cached tokens)
and of 2,048 (the whole prompt), contiguous. Each cell prints the kernel's time (`--attention-backend cpp`), its floor (the
K/V bytes the step reads over the best bandwidth of a copy of that footprint sampled between
the timings), the ratio and its GFLOP/s (causal: a prefill row sees the keys before it); then a layer's whole `attend` (the new K/V written, then attended) with
`--attention-backend cpp` and with the PyTorch backend (`--attention-backend torch`: gather +
SDPA) on the same cache and batch. Arms alternate; min and median of `--reps`, ratios from
the mins.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from engine_decode import copy_bandwidth  # this folder (run as a script)

from specserve.models.attention import CppBackend, PagedBatch, TorchBackend

HEADS, KV, D, PAGE, POOL = 4, 2, 64, 16, 20_000


def tables(batch: int, pages: int, layout: str, gen: torch.Generator) -> torch.Tensor:
    if layout == "contiguous":
        return torch.arange(batch * pages).view(batch, pages)
    if layout == "interleaved":
        return torch.arange(batch * pages).view(pages, batch).t().contiguous()
    return torch.randperm(POOL, generator=gen)[: batch * pages].view(batch, pages)


def cell(cache, batch: int, context: int, width: int, layout: str, reps: int) -> str:
    gen = torch.Generator().manual_seed(batch * context + width)
    pages = -(-context // PAGE)
    table = tables(batch, pages, layout, gen)
    slots = torch.cat(
        [table[i, t // PAGE] * PAGE + t % PAGE for i in range(batch)
         for t in [torch.arange(context - width, context)]]
    )  # fmt: skip
    pb = PagedBatch(torch.full((batch,), width), torch.full((batch,), context), table, slots)
    n = batch * width
    q, k, v = (torch.randn(n, h, D, generator=gen) for h in (HEADS, KV, KV))
    cpp, torch_ctx = (be.context(cache, pb) for be in (CppBackend(), TorchBackend()))
    out = torch.empty_like(q)
    args = cpp.kernel_args

    def kernel() -> None:
        torch.ops.specserve.paged_attention(out, q, cache[0], *args, D**-0.5)

    arms = [kernel, lambda: cpp.attend(0, q, k, v), lambda: torch_ctx.attend(0, q, k, v)]
    times: list[list[float]] = [[] for _ in arms]
    bws = []
    kv_bytes = batch * context * KV * D * 4 * 2
    for fn in arms:
        fn()
    for _ in range(reps):
        for fn, t in zip(arms, times, strict=True):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
        bws.append(copy_bandwidth(kv_bytes))
    ours, layer, theirs = (min(t) for t in times)
    med = [1e3 * statistics.median(t) for t in times]
    floor = kv_bytes / max(bws)
    keys = width * (context - width) + width * (width + 1) // 2  # causal over the new rows
    flops = 4 * batch * keys * HEADS * D
    step = "decode" if width == 1 else f"verify {width}" if width <= 16 else f"prefill {width}"
    return (
        f"| {batch} | {context} | {step} | {layout} | {max(bws) / 1e9:.1f} | {1e3 * floor:.3f} | "
        f"{1e3 * ours:.3f} / {med[0]:.3f} | {ours / floor:.1f}x | {flops / ours / 1e9:.0f} | "
        f"{1e3 * layer:.3f} / {med[1]:.3f} | {1e3 * theirs:.3f} / {med[2]:.3f} | "
        f"{theirs / layer:.1f}x |"
    )


def main() -> None:
    global HEADS, KV  # the shapes `cell` uses
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--layouts", default="contiguous,interleaved,random")
    ap.add_argument("--heads", type=int, default=HEADS, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=KV)
    ap.add_argument("--batches", default="1,10")
    ap.add_argument("--contexts", default="512,1024,2048")
    ap.add_argument(
        "--prefill", action=argparse.BooleanOptionalAction, default=True, help="the chunk cells"
    )
    args = ap.parse_args()
    HEADS, KV = args.heads, args.kv_heads
    torch.set_num_threads(args.threads)
    cache = [torch.randn(2, KV, POOL, PAGE, D)]
    print(
        f"torch threads: {torch.get_num_threads()}; one layer, {HEADS} query heads, {KV} KV heads"
    )
    print(
        "| batch | context | step | pages | copy GB/s | floor ms | kernel ms min / median | "
        "kernel / floor | kernel GFLOP/s | cpp attend ms min / median | "
        "torch attend ms min / median | torch / cpp |"
    )
    print("|---" * 12 + "|")
    for batch in (int(b) for b in args.batches.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            for width in (1, 8):
                for layout in args.layouts.split(","):
                    print(cell(cache, batch, context, width, layout, args.reps), flush=True)
    for width in (
        (512, 2048) if args.prefill else ()
    ):  # one prefill chunk: after 1,536 cached tokens, and a whole prompt
        print(cell(cache, 1, 2048, width, "contiguous", max(2, args.reps // 2)), flush=True)


if __name__ == "__main__":
    main()
