"""MoE serving on this machine: expert memory and decode speed (torch vs MXFP4), --tp-size 1 vs 2,
and n-gram speculative decoding on an MoE target vs a dense target of the same active size.

    .venv/bin/python benchmarks/moe_parallel.py [--tokens 64] [--repeats 3]

Random weights (nothing is downloaded); speed numbers are ratios measured in one run, and on a
shared 2-core CPU they are noisy: read them as orders of magnitude, not to the percent.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch

from specserve.cli import build_parser
from specserve.core import SamplingParams
from specserve.engine.model_runner import BatchSeq
from specserve.models.loader import load_model
from specserve.models.qwen3_moe import expert_bytes
from specserve.quant.convert import convert_checkpoint
from specserve.server.cli import build_engine
from specserve.testing.tiny import make_checkpoint

SIZE = dict(
    vocab_size=1024, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, head_dim=64,
)  # fmt: skip
MOE = dict(model_type="qwen3_moe", num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256)
PROMPT = [11, 12, 13, 14, 15, 11, 12, 13, 14, 15, 11, 12, 13, 14, 15, 16]


def decode_rate(
    path: Path, flags: list[str], tokens: int, repeats: int, threads: int
) -> tuple[float, float]:
    """Median decode tokens/s of one greedy stream (prefill excluded), and the accept length.
    `threads`: torch threads of a single process (parallel ranks get cores / ranks each)."""
    args = build_parser().parse_args(
        ["serve", "--model-path", str(path), "--max-total-tokens", "4096", *flags]
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    engine, _ = build_engine(args)
    rates = []
    try:
        for _ in range(repeats):
            params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
            req = engine.add_request(PROMPT, params)
            engine.step()  # prefill + first token
            start, first = time.perf_counter(), len(req.output_token_ids)
            while engine.has_unfinished():
                engine.step()
            rates.append((len(req.output_token_ids) - first) / (time.perf_counter() - start))
        return statistics.median(rates), engine.stats.avg_accept_length
    finally:
        engine.close()
        torch.set_num_threads(before)


def rss_after_load(path: Path, backend: str) -> tuple[int, int]:
    """(expert bytes, RSS growth) of loading the model with `backend` experts in a fresh process."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_load_and_measure, (path, backend))


def _load_and_measure(path: Path, backend: str) -> tuple[int, int]:
    before = psutil.Process().memory_info().rss
    model, _ = load_model(path, moe_backend=backend)
    model.fuse()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the checkpoint's freed pages back first
    return expert_bytes(model), psutil.Process().memory_info().rss - before


def verify_cost(path: Path, window: int, repeats: int = 20) -> float:
    """t(forward of `window` new tokens) / t(forward of 1), one request at KV length 64, random
    token ids (so an MoE window hits as many distinct experts as real drafts do), 1 thread."""
    args = build_parser().parse_args(["serve", "--model-path", str(path), "--max-total-tokens",
                                      "4096"])  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    engine, _ = build_engine(args)
    runner, vocab, gen = engine.runner, engine.model_config.vocab_size, torch.Generator()
    table = list(range(8))
    runner.forward([BatchSeq(list(range(64)), 0, table, 64)])  # the context
    times = dict.fromkeys((1, window), 0.0)
    for _ in range(repeats):
        for n in times:
            ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
            start = time.perf_counter()
            runner.forward([BatchSeq(ids, 64, table, 0)])
            times[n] += time.perf_counter() - start
    torch.set_num_threads(before)
    return times[window] / times[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="memory,decode,spec", help="which tables to print")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    moe = make_checkpoint(tmp / "moe", seed=0, init_std=0.05, **SIZE, **MOE)
    active = MOE["num_experts_per_tok"] * MOE["moe_intermediate_size"]
    dense = make_checkpoint(tmp / "dense", seed=0, init_std=0.05, intermediate_size=active, **SIZE)
    mx = convert_checkpoint(moe, tmp / "moe-mxfp4").out_dir

    if "memory" in a.parts:
        memory_table(moe, mx)
    if "decode" in a.parts:
        decode_table(moe, mx, dense, a.tokens, a.repeats)
    if "spec" in a.parts:
        spec_table(moe, dense, a.tokens, a.repeats)


def memory_table(moe: Path, mx: Path) -> None:
    mib = 1 << 20
    print("## expert weights (fp32 model, 32 experts x 4 layers, 50M expert params)")
    print("RSS growth: whole model load in a fresh process (non-expert weights ~10 MiB)")
    for backend in ("torch", "mxfp4"):
        nbytes, rss = rss_after_load(moe if backend == "torch" else mx, backend)
        print(
            f"{backend:6s} expert bytes {nbytes / mib:8.1f} MiB   RSS growth {rss / mib:8.1f} MiB"
        )
    print(f"(bf16 experts would be {expert_bytes(load_model(moe)[0]) / 2 / mib:.1f} MiB)")


def decode_table(moe: Path, mx: Path, dense: Path, tokens: int, repeats: int) -> None:
    print("\n## decode tok/s, one greedy stream")
    rows = [
        ("MoE torch experts, 1 proc x 1 thread", moe, [], 1),
        ("MoE mxfp4 experts, 1 proc x 1 thread", mx, [], 1),
        ("MoE torch, --tp-size 2 (2 x 1 thread)", moe, ["--tp-size", "2"], 1),
        ("MoE torch, --ep-size 2 (2 x 1 thread)", moe, ["--ep-size", "2"], 1),
        ("dense (same active), 1 proc x 1 thr", dense, [], 1),
        ("dense (same active), 1 proc x 2 thr", dense, [], 2),
        ("dense, --tp-size 2 (2 x 1 thread)", dense, ["--tp-size", "2"], 1),
    ]
    for name, path, flags, threads in rows:
        rate, _ = decode_rate(path, flags, tokens, repeats, threads)
        print(f"{name:40s} {rate:7.1f} tok/s")


def spec_table(moe: Path, dense: Path, tokens: int, repeats: int) -> None:
    print("\n## n-gram speculative decoding (4 draft tokens), 1 process x 1 thread")
    ngram = ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "5"]
    for name, path in (("MoE", moe), ("dense", dense)):
        plain, _ = decode_rate(path, [], tokens, repeats, 1)
        spec, accept = decode_rate(path, ngram, tokens, repeats, 1)
        cost = verify_cost(path, 5)
        print(
            f"{name:6s} plain {plain:7.1f} tok/s  NGRAM {spec:7.1f} tok/s  "
            f"accept length {accept:.2f}  speedup {spec / plain:.2f}x  "
            f"verify cost t(5 tokens)/t(1) {cost:.2f}"
        )


if __name__ == "__main__":
    main()
