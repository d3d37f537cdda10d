"""Where a speculative round's time goes: target forward, block draft, Markov steps, sampling.

    python benchmarks/spec_round_profile.py --target models/demo/target \\
        --algorithm DSPARK --drafter models/demo/dspark [--verify-policy full]

Runs `--prompts` held-out prompts (code and prose in turn) one at a time, greedy, under
cProfile on one thread, and prints each part's cumulative time as a share of the engine steps.
cProfile adds Python overhead, so the shares are approximate; run on a quiet machine.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from specserve.bench.datasets import domains_in_turn
from specserve.config import SpecConfig
from specserve.core import SamplingParams
from specserve.llm import LLM
from specserve.speculative.factory import build_speculation

PARTS = {  # label -> (file suffix, function name)
    "engine step": ("engine/engine.py", "step"),
    "target forward": ("engine/model_runner.py", "forward"),
    "drafting (propose)": ("speculative/block_drafter.py", "propose"),
    "  block forward": ("speculative/dflash.py", "draft_hidden"),
    "  slot sampling + Markov": ("speculative/dflash.py", "draft"),
    "    Markov steps": ("speculative/dspark.py", "markov_step"),
    "    draws": ("speculative/sampling.py", "draw"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--algorithm", default="DSPARK")
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--verify-policy", default="full")
    ap.add_argument("--prompts-file", default="models/demo/prompts_heldout.jsonl")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--output-len", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prompts = domains_in_turn(args.prompts_file)[: args.prompts]
    llm = LLM(args.target)
    spec = SpecConfig(args.algorithm, args.drafter, verify_policy=args.verify_policy)
    llm.engine.set_speculation(*build_speculation(spec, llm.engine))
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for p in prompts:
        llm.generate([p], params)
    prof.disable()
    elapsed = time.perf_counter() - start
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    cum = {}
    for label, (suffix, name) in PARTS.items():
        cum[label] = sum(v[3] for (f, _, n), v in stats.items() if f.endswith(suffix) and n == name)
    steps = max(llm.engine.stats.num_steps - 1, 1)
    total = cum["engine step"] or elapsed
    print(
        f"{args.algorithm} {args.verify_policy}: {len(prompts) * args.output_len / elapsed:.1f} "
        f"tok/s under cProfile, accept length {llm.engine.stats.avg_accept_length:.2f}, "
        f"{1000 * total / steps:.1f} ms per step"
    )
    for label, t in cum.items():
        print(f"{label:<28}{t:>8.3f} s {100 * t / total:>6.1f}%")


if __name__ == "__main__":
    main()
