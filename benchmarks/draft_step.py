"""The fused greedy draft step (`torch.ops.specserve.draft_block`) against the PyTorch path of the
same block drafter, in one process on one thread, arms alternated:

    python benchmarks/draft_step.py --target models/demo/target --drafter models/demo/dspark

1. One propose: a request of `--prompts-file` decodes `--context` tokens with DSPARK on
   `--attention-backend cpp`, then `drafter.propose` runs `--repeats` times on that state, the
   fused step and the PyTorch path in turn (median ms of each); then the same for a sampled
   request (temperature 1), where the fused arm takes only the draft layers from C++
   (`FusedDraft.hidden`) and picks in PyTorch.
2. End to end: single-stream greedy output tok/s (the prompts one after another) of plain
   decoding (NONE), of the drafter with and without the fused step and, with `--mtp DIR`, of
   NEXTN, over `--prompts` prompts of `--output-len` tokens, the arms in turn for `--rounds`
   rounds (best round of each).
3. Inside those rounds: median ms per call of the engine step, propose, its catch-up and the
   fused op, timed by wrappers over one more fused pass (the target's weights run between
   drafts, so the drafter's are no longer hot as in 1).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from specserve.bench.datasets import domains_in_turn
from specserve.config import SpecConfig
from specserve.core import SamplingParams
from specserve.llm import LLM
from specserve.speculative.factory import build_speculation


def propose_ms(
    llm: LLM, prompt: list[int], context: int, repeats: int, temperature: float = 0.0
) -> dict[str, float]:
    """Median ms of one propose (block of the drafter's size) with and without the fused step."""
    eng, drafter = llm.engine, llm.engine.drafter
    params = SamplingParams(
        max_tokens=context + 64, temperature=temperature, seed=0, ignore_eos=True
    )  # an EOS before `context` tokens would leave the loop below waiting forever
    req = eng.add_request(prompt, params)
    while len(req.output_token_ids) < context:
        eng.step()
    fused, times = drafter.fused, {"fused": [], "torch": []}
    drafter.propose([req], [drafter.block_size])  # folds in the deferred rows
    for i in range(2 * repeats):
        arm = ("fused", "torch")[i % 2]
        drafter.fused = fused if arm == "fused" else None
        start = time.perf_counter()
        drafter.propose([req], [drafter.block_size])
        times[arm].append(1000 * (time.perf_counter() - start))
    drafter.fused = fused
    eng.abort(req.request_id)
    return {arm: statistics.median(t) for arm, t in times.items()}


def timed(fn: Callable, into: list[float]) -> Callable:
    def call(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        into.append(1000 * (time.perf_counter() - start))
        return out

    return call


def round_breakdown(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> str:
    """Median ms per call of the parts of real rounds (one pass over the prompts, fused on)."""
    eng, drafter = llm.engine, llm.engine.drafter
    parts: dict[str, list[float]] = {"step": [], "propose": [], "catch-up": [], "op": []}
    cls = type(drafter.fused)
    call = cls.__call__
    eng.step = timed(eng.step, parts["step"])
    drafter.propose = timed(drafter.propose, parts["propose"])
    drafter._catch_up = timed(drafter._catch_up, parts["catch-up"])
    cls.__call__ = timed(call, parts["op"])
    try:
        for prompt in prompts:
            llm.generate([prompt], params)
    finally:  # back to the class's methods
        cls.__call__ = call
        del eng.step, drafter.propose, drafter._catch_up
    return ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in parts.items() if v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--algorithm", default="DSPARK")
    ap.add_argument("--mtp", help="an MTP drafter folder: a NEXTN arm too")
    ap.add_argument("--prompts-file", default="models/demo/prompts_heldout.jsonl")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--context", type=int, default=128, help="decoded tokens before proposing")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prompts = domains_in_turn(args.prompts_file)[: args.prompts]
    plain = LLM(args.target, attention_backend="cpp")
    spec = LLM(args.target, attention_backend="cpp")
    cfg = SpecConfig(args.algorithm, args.drafter, verify_policy="full")
    spec.engine.set_speculation(*build_speculation(cfg, spec.engine))
    llms = {"NONE": plain, "fused": spec, "torch": spec}
    if args.mtp:
        llms["NEXTN"] = LLM(args.target, attention_backend="cpp")
        mtp = SpecConfig("NEXTN", args.mtp, verify_policy="full")
        llms["NEXTN"].engine.set_speculation(*build_speculation(mtp, llms["NEXTN"].engine))
    drafter = spec.engine.drafter
    if getattr(drafter, "fused", None) is None:
        raise SystemExit(f"{args.drafter}: the fused draft step does not apply to this drafter")
    ms = propose_ms(spec, prompts[0], args.context, args.repeats)
    print(
        f"propose (1 request, {args.context} decoded tokens, block {drafter.block_size}): "
        f"fused {ms['fused']:.3f} ms, PyTorch path {ms['torch']:.3f} ms "
        f"({ms['torch'] / ms['fused']:.2f}x)"
    )
    ms = propose_ms(spec, prompts[0], args.context, args.repeats, temperature=1.0)
    print(
        f"propose at temperature 1: draft layers in C++ {ms['fused']:.3f} ms, PyTorch path "
        f"{ms['torch']:.3f} ms ({ms['torch'] / ms['fused']:.2f}x)"
    )
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    for llm in llms.values():
        llm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0))  # warm-up
    fused, best = drafter.fused, dict.fromkeys(llms, 0.0)
    for _ in range(args.rounds):
        for arm, llm in llms.items():
            drafter.fused = fused if arm == "fused" else None
            start = time.perf_counter()
            for prompt in prompts:  # one at a time: a single stream
                llm.generate([prompt], params)
            tps = len(prompts) * args.output_len / (time.perf_counter() - start)
            best[arm] = max(best[arm], tps)
    drafter.fused = fused
    print(
        f"single stream, {len(prompts)} x {args.output_len} tokens, best of {args.rounds}: "
        f"NONE {best['NONE']:.0f} tok/s, {args.algorithm} fused {best['fused']:.0f} "
        f"({best['fused'] / best['NONE']:.2f}x NONE), {args.algorithm} PyTorch draft "
        f"{best['torch']:.0f} ({best['torch'] / best['NONE']:.2f}x NONE)"
    )
    print(f"in those rounds, median ms per call: {round_breakdown(spec, prompts, params)}")
    if args.mtp:
        print(
            f"NEXTN {best['NEXTN']:.0f} tok/s ({best['NEXTN'] / best['NONE']:.2f}x NONE); "
            f"{args.algorithm} fused {best['fused'] / best['NEXTN']:.2f}x NEXTN"
        )


if __name__ == "__main__":
    main()
