"""How far an ideal parallel drafter (DFlash) could go at temperature 1 on a given target.

    python benchmarks/parallel_draft_ceiling.py --target models/demo/target \
        --data build/demo/data_heldout [--drafter models/demo/dflash]

A parallel drafter draws slot k without seeing the tokens drawn at slots < k, so its best
distribution for slot k is (close to) the target's *marginal* over slot k: the target's
next-token distribution averaged over the target's own samples of slots 1..k-1. This script
estimates those marginals by Monte Carlo (`--rollouts` target samples of the block per anchor,
averaging full distributions, not counts), drafts from them, and verifies the drafts against
the target exactly as `specserve eval drafter --temperature 1` does: slot k is accepted with
probability min(1, p_k / q_k), p_k along the drafted tokens. It prints the expected accept
length (bonus included) per domain for this oracle, for q ~ m^beta, and for the single q per
slot that maximizes the mean acceptance over the rollouts (fitted on them), on the held-out
temperature-1 continuations.

With `--drafter`, the trained parallel drafter is scored on the same anchors the same way, as a
check that the oracle is above it. The oracle sees the whole target, so it estimates the most
that any drafter drawing its slots independently can accept on this target, whatever its size
or training (the fitted best q per slot, which ignores how slots chain, is the generous end).
"""

from __future__ import annotations

import argparse
import time

import torch

from specserve.models.loader import load_model
from specserve.train.evaluate import (
    continuations,
    drafts_and_alpha,
    expected_tau,
    parallel_oracle_alpha,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--data", required=True, help="a gen-data folder of held-out prompts")
    ap.add_argument("--drafter", help="a trained DFlash drafter to score on the same anchors")
    ap.add_argument("--block-size", type=int, default=7)
    ap.add_argument("--rollouts", type=int, default=32, help="target samples per anchor")
    ap.add_argument("--anchor-stride", type=int, default=8)
    ap.add_argument("--betas", type=float, nargs="+", default=[1.0, 0.75])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    target, _ = load_model(args.target)
    drafter = None
    if args.drafter:
        from specserve.speculative.checkpoint import load_drafter
        from specserve.speculative.handle import TargetHandle

        drafter = load_drafter(args.drafter, TargetHandle.of(target))
    k = args.block_size
    seqs, p, domains = continuations(target, args.data, 1.0)
    anchors = torch.arange(p, seqs.shape[1] - k, args.anchor_stride)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    per_seq = [
        parallel_oracle_alpha(target, s, anchors, k, args.rollouts, gen, args.betas, best=True)
        for s in seqs
    ]
    oracle = torch.stack(per_seq, 1)  # [betas, B, A, M, K]
    trained = None
    if drafter is not None:
        parts = []
        for i in range(0, len(seqs), 8):
            rows = seqs[i : i + 8]
            at = anchors.expand(len(rows), -1)
            parts.append(drafts_and_alpha(target, drafter, "dflash", rows, p, k, 1.0, gen, at)[1])
        trained = torch.cat(parts)  # [B, A, K]
    print(
        f"{len(seqs)} sequences, {len(anchors)} anchors each (stride {args.anchor_stride}), "
        f"{args.rollouts} rollouts per anchor, block {k}, {time.time() - start:.0f} s"
    )
    for d in sorted(set(domains)):
        idx = torch.tensor([i for i, x in enumerate(domains) if x == d])
        cells = [
            f"oracle beta={b:g} tau {expected_tau(oracle[j, idx]).mean():.2f}"
            for j, b in enumerate(args.betas)
        ] + [f"oracle best-q tau {expected_tau(oracle[-1, idx]).mean():.2f}"]
        slots = oracle[0, idx].mean((0, 1, 2))
        line = f"t=1 {d:<6} " + ", ".join(cells)
        if trained is not None:
            line += f", trained drafter tau {expected_tau(trained[idx]).mean():.2f}"
        print(line)
        print(
            f"  oracle beta=1 unconditional acceptance per slot: {' '.join(f'{x:.2f}' for x in slots)}"
        )


if __name__ == "__main__":
    main()
