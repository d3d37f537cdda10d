"""`make demo`'s comparison in alternated rounds: the same arms, workloads and servers as
`python -m specserve.demo`, run `--rounds` times with the arms' order reversed every other
round (NONE, MTP, DSPARK, then DSPARK, MTP, NONE, ...), so that a busy spell of a shared host
does not always fall on the same arm; prints each arm's output throughput (min / median over
the rounds) and the ratios of the medians:

    python benchmarks/demo_rounds.py --rounds 4 --out runs/demo_rounds

Each round is one `bench compare` run (report, results and server logs under OUT/round-N).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from specserve.bench.compare import run_compare
from specserve.demo import BUNDLE, attention_backend, compare_config, plan_workloads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=BUNDLE)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("runs/demo_rounds"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    workloads, notes = plan_workloads(args.bundle, args.out)
    config = compare_config(args.bundle, workloads, notes, attention_backend())
    arms = [a["name"] for a in config["arms"]]
    results: list[dict] = []
    for rnd in range(args.rounds):
        cfg = dict(config, arms=config["arms"] if rnd % 2 == 0 else config["arms"][::-1])
        out = args.out / f"round-{rnd}"
        out.mkdir(exist_ok=True)
        path = out / "compare.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(f"== round {rnd}: {' -> '.join(a['name'] for a in cfg['arms'])}", flush=True)
        run_compare(path, out)
        for line in (out / "results.jsonl").read_text().splitlines():
            results.append(json.loads(line))
    base, cand = arms[0], arms[-1]
    mtp = arms[1] if len(arms) > 2 else None
    print(f"\n{args.rounds} rounds, arms alternated; output tok/s min / median")
    for wl in workloads:
        name = wl["name"]
        tok = {
            a: [r["output_throughput"] for r in results if r["arm"] == a and r["workload"] == name]
            for a in arms
        }
        med = {a: statistics.median(v) for a, v in tok.items() if v}
        cells = "; ".join(f"{a} {min(v):.1f} / {med[a]:.1f}" for a, v in tok.items() if v)
        print(f"{name}: {cells}")
        for other in (base, mtp):
            if other is None or not tok[other] or len(tok[other]) != len(tok[cand]):
                continue
            ratios = [c / o for c, o in zip(tok[cand], tok[other], strict=True)]
            print(
                f"  {cand} vs {other}: {min(ratios):.2f}x / {statistics.median(ratios):.2f}x "
                f"(min / median of the rounds' ratios)"
            )


if __name__ == "__main__":
    main()
