"""TTFT of a request that repeats a long prefix, with a hidden-state drafter: prefix caching on
vs off, in one process, arms alternated A B A B.

    python benchmarks/prefix_ttft.py --target models/demo/target \\
        --algorithm DSPARK --drafter models/demo/dspark

Every round sends the same shared prefix (`--prefix-len` tokens) plus a new tail
(`--new-len` tokens), so only the prefix can come from the cache. The text is a Python source
file (default: the standard library's `argparse.py`) tokenized with the target's tokenizer.
TTFT is wall time from `add_request` to the engine step that returns the first token (no HTTP).
Both arms warm up with one request of the same prefix. Greedy outputs must be identical.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from specserve.config import SpecConfig
from specserve.core import SamplingParams
from specserve.engine.tokenizer import Tokenizer
from specserve.llm import LLM
from specserve.speculative.factory import build_speculation


def make_engine(args: argparse.Namespace, prefix_caching: bool) -> LLM:
    llm = LLM(
        args.target,
        max_total_tokens=args.max_total_tokens,
        enable_prefix_caching=prefix_caching,
        num_threads=args.num_threads,
    )
    spec = SpecConfig(args.algorithm, args.drafter, verify_policy=args.verify_policy)
    llm.engine.set_speculation(*build_speculation(spec, llm.engine))
    return llm


def ttft(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[float, int, list[int]]:
    """-> (seconds to the first token, cached prompt tokens, greedy output)."""
    eng = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    req = eng.add_request(prompt, params)
    first = None
    while eng.has_unfinished():
        outs = eng.step()
        if first is None and any(o.new_token_ids for o in outs):
            first = time.perf_counter() - start
    assert first is not None
    return first, req.num_cached_tokens, req.output_token_ids


def main() -> None:
    import argparse as argparse_module

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="models/demo/target")
    ap.add_argument("--algorithm", default="DSPARK")
    ap.add_argument("--drafter", default="models/demo/dspark")
    ap.add_argument("--verify-policy", default=None)
    ap.add_argument("--text-file", default=argparse_module.__file__)
    ap.add_argument("--prefix-len", type=int, default=1536)
    ap.add_argument("--new-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-total-tokens", type=int, default=16384)
    ap.add_argument("--num-threads", type=int, default=None)
    args = ap.parse_args()

    ids = Tokenizer(args.target).encode(Path(args.text_file).read_text())
    need = args.prefix_len + args.new_len * (args.rounds + 1)
    if len(ids) < need:
        raise SystemExit(f"{args.text_file}: {len(ids)} tokens, need {need}")
    prefix = ids[: args.prefix_len]
    tails = [
        ids[args.prefix_len + i * args.new_len : args.prefix_len + (i + 1) * args.new_len]
        for i in range(args.rounds + 1)
    ]
    arms = {"on": make_engine(args, True), "off": make_engine(args, False)}
    for llm in arms.values():  # warm-up: fills the prefix cache of the "on" arm
        ttft(llm, prefix + tails[-1], args.max_tokens)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(args.rounds):
        outputs = []
        for name, llm in arms.items():
            t, cached, out = ttft(llm, prefix + tails[i], args.max_tokens)
            times[name].append(t)
            outputs.append(out)
            print(f"round {i} {name:>3}: TTFT {t * 1000:7.1f} ms, cached tokens {cached}")
        assert outputs[0] == outputs[1], f"round {i}: greedy outputs differ between arms"
    print(
        f"{args.algorithm}, prompt {args.prefix_len} shared + {args.new_len} new tokens, "
        f"{args.rounds} rounds, greedy outputs identical across arms"
    )
    for name, ts in times.items():
        print(
            f"prefix caching {name:>3}: TTFT min {min(ts) * 1000:7.1f} ms, "
            f"median {statistics.median(ts) * 1000:7.1f} ms"
        )
    on, off = times["on"], times["off"]
    print(
        f"off/on: min {min(off) / min(on):.2f}x, "
        f"median {statistics.median(off) / statistics.median(on):.2f}x"
    )


if __name__ == "__main__":
    main()
