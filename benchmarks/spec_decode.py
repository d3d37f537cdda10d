"""Speculative decoding on one machine, in one run: accept length, tok/s and speedup over NONE.

    python benchmarks/spec_decode.py --target models/demo/target \\
        --drafter NEXTN=models/demo/mtp --drafter DSPARK=models/demo/dspark --drafter NGRAM

Without --target it builds a tiny random target and random drafters in a temporary folder and
says so: the pipeline runs, but random drafters are (almost) never accepted, so the speedups
it prints say nothing about trained drafters. Greedy outputs are checked against NONE.

Each arm's engine first runs the whole workload once, untimed: a gated speculative engine learns
its draft gate in that pass (step times, each kind's acceptance), as a serving engine does in
its first minutes. Then `--repeats` timed passes alternate the arms (in order, then reversed, as
A B B A), and each arm's speedup is its tok/s over NONE's in the same pass: the median and the
lowest over the passes are printed. Prefix caching is off, so every pass prefills like the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from specserve.bench.datasets import domains_in_turn
from specserve.config import SpecConfig
from specserve.core import SamplingParams
from specserve.llm import LLM
from specserve.speculative.factory import build_speculation


def _random_bundle(root: Path) -> tuple[Path, dict[str, Path | None]]:
    from specserve.speculative.checkpoint import new_drafter, save_drafter
    from specserve.testing.tiny import make_checkpoint

    target = make_checkpoint(root / "target", init_std=0.2)
    raw = json.loads((target / "config.json").read_text())
    common = dict(block_size=7, mask_token_id=3, target_layer_ids=[-1, 1])
    save_drafter(new_drafter(raw, "mtp"), root / "mtp")
    save_drafter(new_drafter(raw, "dflash", **common), root / "dflash")
    dspark = new_drafter(raw, "dspark", markov_rank=64, enable_confidence_head=True, **common)
    save_drafter(dspark, root / "dspark")
    return target, {
        "NGRAM": None,
        "NEXTN": root / "mtp",
        "DFLASH": root / "dflash",
        "DSPARK": root / "dspark",
    }


def _prompts(n: int, length: int, vocab: int, motif_len: int = 8) -> list[list[int]]:
    import random

    rng = random.Random(0)
    out = []
    for _ in range(n):
        motif = [rng.randrange(4, vocab) for _ in range(motif_len)]
        out.append((motif * (length // 8 + 1))[:length])  # some repetition, as in real text
    return out


def make_engine(
    target, algorithm, path, policy, max_running, tokens, adaptive=False, backend="torch"
):
    """An arm's engine; its KV cache holds `tokens` (every arm lives for the whole level)."""
    llm = LLM(
        str(target),
        max_running_requests=max_running,
        max_total_tokens=tokens,
        attention_backend=backend,
        enable_prefix_caching=False,
    )
    if algorithm != "NONE":
        spec = SpecConfig(
            algorithm,
            str(path) if path else None,
            verify_policy=policy,
            adaptive_drafting=adaptive,
        )
        llm.engine.set_speculation(*build_speculation(spec, llm.engine))
    return llm


def timed_pass(llm: LLM, prompts, params) -> dict:
    stats = llm.engine.stats
    passes, accepted = stats.num_verify_passes, stats.num_accepted_tokens
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    passes = stats.num_verify_passes - passes
    return {
        "tok_s": tokens / elapsed,
        "accept": 1.0 + (stats.num_accepted_tokens - accepted) / max(1, passes),
        "outputs": [o.outputs[0].token_ids for o in outs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", help="target model folder (default: a tiny random one)")
    ap.add_argument(
        "--drafter",
        action="append",
        default=[],
        help="ALGO=folder (NEXTN, DFLASH, DSPARK) or NGRAM; repeatable",
    )
    ap.add_argument(
        "--prompts",
        help="JSON lines with token_ids (e.g. the bundle's held-out "
        "prompts_heldout.jsonl); default: synthetic repeated motifs",
    )
    ap.add_argument(
        "--random-ids",
        action="store_true",
        help="synthetic prompts of uniformly random token ids (no repeated motif)",
    )
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="prompts per concurrency slot: conc x rounds prompts, at most conc running at once",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per arm (alternated)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--verify-policy", default=None, help="full | threshold | scheduler")
    ap.add_argument(
        "--adaptive-drafting",
        action="store_true",
        help="also run each algorithm with --speculative-adaptive-drafting (rows ALGO+gate)",
    )
    ap.add_argument("--attention-backend", default="torch", help="torch | cpp (every arm)")
    args = ap.parse_args()

    tmp = None
    if args.target:
        target = Path(args.target)
        drafters = {}
        for item in args.drafter:
            algo, _, folder = item.partition("=")
            drafters[algo.upper()] = Path(folder) if folder else None
    else:
        tmp = tempfile.TemporaryDirectory()
        target, drafters = _random_bundle(Path(tmp.name))
        print("NOTE: no --target given: tiny RANDOM target and RANDOM drafters (pipeline check,")
        print("      not a measurement of trained drafters; expect accept length ~1).")
    vocab = json.loads((target / "config.json").read_text())["vocab_size"]
    params = SamplingParams(
        max_tokens=args.output_len, temperature=args.temperature, ignore_eos=True, seed=0
    )
    print(
        f"target {target}  output {args.output_len} tokens  temperature {args.temperature}  "
        f"attention backend {args.attention_backend}  {args.repeats} alternated timed passes"
    )
    print(
        f"{'algorithm':<12}{'conc':>4}{'accept':>9}{'tok/s med':>11}"
        f"{'speedup med':>13}{'min':>6}  greedy==NONE"
    )
    gates = (False, True) if args.adaptive_drafting else (False,)
    for conc in (int(c) for c in args.concurrency.split(",")):
        if args.prompts:
            rows = domains_in_turn(args.prompts)
            n = conc * args.rounds
            prompts = [rows[i % len(rows)][: args.input_len] for i in range(n)]
        else:
            motif = args.input_len if args.random_ids else 8
            prompts = _prompts(conc * args.rounds, args.input_len, vocab, motif)
        backend = args.attention_backend
        tokens = conc * (args.input_len + args.output_len + 32) + 1024
        engines = {"NONE": make_engine(target, "NONE", None, None, conc, tokens, backend=backend)}
        for algo, path in drafters.items():
            for gate in gates:
                name = algo + ("+gate" if gate else "")
                engines[name] = make_engine(
                    target, algo, path, args.verify_policy, conc, tokens, gate, backend
                )
        for llm in engines.values():
            llm.generate(prompts, params)  # warm-up: the same workload, untimed
        results: dict[str, list[dict]] = {name: [] for name in engines}
        for r in range(args.repeats):
            for name in list(engines) if r % 2 == 0 else list(engines)[::-1]:
                results[name].append(timed_pass(engines[name], prompts, params))
        base = results["NONE"]
        for name, rs in results.items():
            ratios = [x["tok_s"] / b["tok_s"] for x, b in zip(rs, base, strict=True)]
            same = all(x["outputs"] == b["outputs"] for x, b in zip(rs, base, strict=True))
            check = "n/a" if args.temperature > 0 or name == "NONE" else "yes" if same else "NO"
            print(
                f"{name:<12}{conc:>4}{statistics.mean(x['accept'] for x in rs):>9.2f}"
                f"{statistics.median(x['tok_s'] for x in rs):>11.1f}"
                f"{statistics.median(ratios):>13.2f}{min(ratios):>6.2f}  {check}",
                flush=True,
            )
        del engines
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
