"""The fused greedy draft step (`draft_block`) of a batch: R requests drafting a block over L
context rows each, on one thread and on two, alternated in one process:

    python benchmarks/draft_batch.py --bundle models/demo

Each cell (R, L) times `FusedDraft.__call__` on random context rows `--reps` times per thread
count and round (min and median ms over the rounds' medians). The floor is the step's FLOPs
(the draft layers, its attention over L + block keys, the LM head, the Markov head) at the
`torch.mm` rate measured at the same thread count in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from specserve.config import SpecConfig
from specserve.llm import LLM
from specserve.speculative.factory import build_speculation


def mm_rate(threads: int, n: int = 512, reps: int = 20) -> float:
    """GFLOP/s of a float32 n x n x n torch.mm at `threads` (the best of `reps`)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def step_flops(cfg, requests: int, context: int, block: int, rank: int) -> float:
    """Multiply-adds x 2 of one draft_block call (products, attention, LM head, Markov head)."""
    h, inter, heads, d = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.head_dim,
    )
    kv, vocab = cfg.num_key_value_heads, cfg.vocab_size
    layer = h * (heads * d + 2 * kv * d) + heads * d * h + 3 * h * inter
    attention = heads * (context + block) * d * 2
    per_row = layer + attention + h * vocab + rank * vocab
    return 2.0 * requests * block * per_row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="models/demo")
    ap.add_argument("--cells", default="10x2048,1x2048,10x256,1x256", help="RxL,...")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    bundle = Path(args.bundle)
    llm = LLM(str(bundle / "target"), max_total_tokens=8192, attention_backend="cpp")
    drafter, _ = build_speculation(SpecConfig("DSPARK", str(bundle / "dspark")), llm.engine)
    fused = drafter.fused
    if fused is None:
        raise SystemExit("the drafter does not fit the fused step (needs --attention-backend cpp)")
    model, k = drafter.model, drafter.block_size
    cfg = llm.engine.model_config
    kv, d = cfg.num_key_value_heads, cfg.head_dim
    rank = getattr(model.config, "markov_rank", 0) or 0
    gen = torch.Generator().manual_seed(0)
    rates = {t: mm_rate(t) for t in (1, 2)}
    print(f"torch.mm 512^3: {rates[1]:.0f} GFLOP/s on one thread, {rates[2]:.0f} on two")
    print("| requests | context | threads | ms min / median | floor ms | vs floor |")
    print("|---|---|---|---|---|---|")
    for cell in args.cells.split(","):
        r, n = (int(x) for x in cell.split("x"))
        ctx = [
            [(torch.randn(n, kv, d, generator=gen), torch.randn(n, kv, d, generator=gen))]
            * len(model.layers)
            for _ in range(r)
        ]
        anchor = torch.randint(3, cfg.vocab_size, (r,), generator=gen)
        pos = torch.full((r,), n, dtype=torch.long)
        medians: dict[int, list[float]] = {1: [], 2: []}
        for rnd in range(args.rounds):
            for threads in (1, 2) if rnd % 2 == 0 else (2, 1):
                torch.set_num_threads(threads)
                for _ in range(3):
                    fused(anchor, pos, ctx, k)
                times = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    fused(anchor, pos, ctx, k)
                    times.append(time.perf_counter() - t)
                medians[threads].append(statistics.median(times) * 1e3)
        flops = step_flops(cfg, r, n, k, rank)
        for threads, ms in medians.items():
            floor = flops / (rates[threads] * 1e9) * 1e3
            print(
                f"| {r} | {n} | {threads} | {min(ms):.2f} / {statistics.median(ms):.2f} | "
                f"{floor:.2f} | {min(ms) / floor:.1f}x |"
            )


if __name__ == "__main__":
    main()
