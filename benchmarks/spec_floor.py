"""The speculation floor: every speculative arm, default policy, against plain decoding on
workloads where drafting may not pay (issue 15: at least 0.95x NONE's output throughput).

    python benchmarks/spec_floor.py --bundle models/demo [--attention-backend cpp]

Workloads (`--users` prompts of `--input-len` tokens each, `--output-len` greedy tokens out):
* random: uniformly random token ids (seeded);
* python: Python sources from this interpreter's site-packages, which are in neither split of
  the bundle's training data (`train/data.py` reads the standard library without
  site-packages), one file per prompt cut to its first `--input-len` tokens;
* prose: the bundle's held-out prose (`prompts_long.jsonl`, whole man pages).

One engine per arm (NONE, NGRAM, NEXTN, DFLASH, DSPARK) serves every workload in turn, as a
server would; prefix caching is off so that no round reuses another's prefill. Rounds alternate
the arms' order. Output throughput = output tokens / wall time of the batch, prefill included
(`bench_serving`'s output token throughput), and the same per CPU second of this process
(`time.process_time`): with one thread it equals wall time on a quiet machine, and it is what
stays comparable when other jobs share the cores. Greedy outputs are checked against NONE's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sysconfig
import time
from pathlib import Path

from specserve.bench.datasets import domains_in_turn
from specserve.config import SpecConfig
from specserve.core import SamplingParams
from specserve.engine.tokenizer import Tokenizer
from specserve.llm import LLM
from specserve.speculative.factory import build_speculation

ARMS = {"NONE": None, "NGRAM": None, "NEXTN": "mtp", "DFLASH": "dflash", "DSPARK": "dspark"}


def random_prompts(users: int, length: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(users)]


def python_prompts(tokenizer: Tokenizer, users: int, length: int) -> list[list[int]]:
    """The first `length` tokens of `users` site-packages sources of at least that many tokens,
    picked in a fixed order (sorted by a hash of their path)."""
    root = Path(sysconfig.get_paths()["purelib"])
    files = sorted(
        root.rglob("*.py"),
        key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest(),
    )
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")[: 16 * length]
        ids = tokenizer.encode(text)
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == users:
            return out
    raise SystemExit(f"only {len(out)} site-packages sources have {length} tokens")


def prose_prompts(bundle: Path, users: int, length: int) -> list[list[int]]:
    rows = [r for r in domains_in_turn(bundle / "prompts_long.jsonl", length)[1::2]]
    if len(rows) < users:
        raise SystemExit(f"{bundle}/prompts_long.jsonl has {len(rows)} prose prompts of {length}")
    return rows[:users]


def make_arm(bundle: Path, algo: str, args: argparse.Namespace) -> LLM:
    llm = LLM(
        str(bundle / "target"),
        max_running_requests=args.users,
        max_total_tokens=args.users * (args.input_len + args.output_len + 16) + 1024,
        enable_prefix_caching=False,
        attention_backend=args.attention_backend,
    )
    if algo != "NONE":
        folder = ARMS[algo]
        path = str(bundle / folder) if folder else None
        if args.no_adaptive_drafting:
            spec = SpecConfig(algo, path, adaptive_drafting=False)
        else:
            spec = SpecConfig(algo, path)  # the default policy
        llm.engine.set_speculation(*build_speculation(spec, llm.engine))
    llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    return llm


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict:
    st = llm.engine.stats
    passes, accepted = st.num_verify_passes, st.num_accepted_tokens
    start, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = [o.outputs[0].token_ids for o in outs]
    passes = st.num_verify_passes - passes
    n = sum(map(len, tokens))
    return {
        "tok_s": n / elapsed,
        "tok_cpu_s": n / cpu,
        "accept": 1.0 + (st.num_accepted_tokens - accepted) / max(1, passes),
        "tokens": tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default="models/demo", help="target + mtp/dflash/dspark folders")
    ap.add_argument("--workloads", default="random,python,prose")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--attention-backend", default="torch", help="torch | cpp (every arm)")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: sampled (no greedy check)")
    ap.add_argument(
        "--no-adaptive-drafting",
        action="store_true",
        help="speculative arms without the draft gate (what --no-speculative-adaptive-drafting "
        "serves)",
    )
    args = ap.parse_args()
    bundle = Path(args.bundle)
    tok = Tokenizer(bundle / "target")
    vocab = json.loads((bundle / "target" / "config.json").read_text())["vocab_size"]
    makers = {
        "random": lambda: random_prompts(args.users, args.input_len, vocab),
        "python": lambda: python_prompts(tok, args.users, args.input_len),
        "prose": lambda: prose_prompts(bundle, args.users, args.input_len),
    }
    workloads = {w: makers[w]() for w in args.workloads.split(",")}
    arms = args.arms.split(",")
    assert arms[0] == "NONE", "--arms must start with NONE (the reference)"
    llms = {a: make_arm(bundle, a, args) for a in arms}
    params = SamplingParams(
        max_tokens=args.output_len, temperature=args.temperature, ignore_eos=True, seed=0
    )
    gate = "off" if args.no_adaptive_drafting else "default (on)"
    print(
        f"{args.users} users x {args.input_len} tokens in, {args.output_len} out, "
        f"temperature {args.temperature}; "
        f"backend {args.attention_backend}; draft gate {gate}; {args.rounds} rounds"
    )
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        order = arms if r % 2 == 0 else arms[::-1]
        for w, prompts in workloads.items():
            for a in order:
                res = run(llms[a], prompts, params)
                results.setdefault((w, a), []).append(res)
                print(
                    f"  round {r} {w:<7}{a:<7}{res['tok_s']:>8.1f} tok/s "
                    f"{res['tok_cpu_s']:>8.1f} tok/CPU-s",
                    flush=True,
                )
    print(
        f"\n{'workload':<9}{'arm':<8}{'tok/s med':>10}{'vs NONE min':>12}{'med':>6}"
        f"{'tok/CPU-s med':>14}{'vs NONE min':>12}{'med':>6}{'accept':>8}  greedy==NONE"
    )
    for w in workloads:
        base = results[(w, "NONE")]
        for a in arms:
            rs = results[(w, a)]
            same = all(x["tokens"] == b["tokens"] for x, b in zip(rs, base, strict=True))
            cols = ""
            for key in ("tok_s", "tok_cpu_s"):
                ratios = [x[key] / b[key] for x, b in zip(rs, base, strict=True)]
                med = statistics.median(x[key] for x in rs)
                cols += f"{med:>{10 if key == 'tok_s' else 14}.1f}{min(ratios):>12.2f}"
                cols += f"{statistics.median(ratios):>6.2f}"
            accept = statistics.mean(x["accept"] for x in rs)
            check = "n/a" if args.temperature > 0 else "yes" if same else "NO"
            print(f"{w:<9}{a:<8}{cols}{accept:>8.2f}  {check}")


if __name__ == "__main__":
    main()
