"""The NEXTN drafter's step (propose: the catch-up over the newly committed rows, then the chain)
before and after its K/V rows were kept in place, one thread, arms alternated:

    python benchmarks/mtp_step.py --target models/demo/target --drafter models/demo/mtp

Arms, each with its own drafter over the same MTP module (weights tiled as with
`--attention-backend cpp`) and the same streams:
  old    `MTPDrafter` of `--old-rev` (per-request K/V tensors, `PrefixAttention`: a torch.cat of
         the whole context and one SDPA per request, every chain step and every catch-up)
  torch  this tree's drafter on its PyTorch path (`KVRows` in place, SDPA per request)
  cpp    this tree's drafter on the C++ `row_attention` (all requests in one call)
Each setting (`--settings`: requests x context) starts every arm from the same random prompt
(tokens and target hidden rows; timing depends on the shapes only), times that first
propose (the prompt's catch-up), then runs `--steps` steps per round: each request commits
`--accept` tokens, their rows are handed over (`update`) and `propose` drafts
`--speculative-num-steps` tokens. Rounds alternate the arms (old, torch, cpp, old, ...); it
prints min and median ms per step of each arm over all rounds, and the ratios to old.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types

import torch

from specserve.config import SpecConfig
from specserve.core import Request, SamplingParams
from specserve.llm import LLM
from specserve.speculative.factory import build_speculation
from specserve.speculative.mtp import MTPDrafter, MTPModule

OLD_REV = "b3c738e"  # the last commit with `PrefixAttention`


def old_drafter_class(rev: str) -> type:
    """`MTPDrafter` as `specserve/speculative/mtp.py` was at `rev` (read with git)."""
    src = subprocess.run(
        ["git", "show", f"{rev}:specserve/speculative/mtp.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    mod = types.ModuleType("mtp_old")
    sys.modules["mtp_old"] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:mtp.py", "exec"), mod.__dict__)
    return mod.MTPDrafter


class Streams:
    """R requests of random tokens and hidden rows, fed to one drafter as the engine would."""

    def __init__(self, drafter, module: MTPModule, requests: int, context: int, room: int):
        gen = torch.Generator().manual_seed(0)
        vocab, width = module.config.vocab_size, module.config.hidden_size
        self.drafter, self.n = drafter, context
        self.tokens = torch.randint(0, vocab, (requests, context + room), generator=gen).tolist()
        self.hidden = torch.randn(requests, context + room, width, generator=gen)
        params = SamplingParams(max_tokens=room, temperature=0)
        self.reqs = [Request(t[:context], params, room, request_id=str(i))
                     for i, t in enumerate(self.tokens)]  # fmt: skip
        self.hand_over(0)

    def hand_over(self, first_row: int) -> None:
        """Rows first_row .. n - 2 computed; tokens 0 .. n - 1 known."""
        for req, toks in zip(self.reqs, self.tokens, strict=True):
            req.output_token_ids = toks[len(req.prompt_token_ids) : self.n]
            req.num_computed_tokens = self.n - 1
        self.drafter.update(self.reqs, list(self.hidden[:, first_row : self.n - 1]))

    def step(self, accept: int, k: int) -> float:
        """Commit `accept` tokens, then one timed propose -> ms."""
        self.n += accept
        self.hand_over(self.n - 1 - accept)
        return self.propose(k)

    def propose(self, k: int) -> float:
        start = time.perf_counter()
        self.drafter.propose(self.reqs, [k] * len(self.reqs))
        return 1000 * (time.perf_counter() - start)


def run_setting(arms: dict, module: MTPModule, requests: int, context: int, args) -> None:
    room = args.rounds * args.steps * args.accept + 8
    streams = {
        name: Streams(make(), module, requests, context, room) for name, make in arms.items()
    }
    prompt = {name: s.propose(args.k) for name, s in streams.items()}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, s in streams.items():
            times[name] += [s.step(args.accept, args.k) for _ in range(args.steps)]
    print(f"{requests} request(s) x {context} tokens, {args.k} draft steps, accept {args.accept}:")
    old = times["old"]
    for name, t in times.items():
        mn, md = min(t), statistics.median(t)
        ratio = (
            f" (old / this: min {min(old) / mn:.2f}x, median {statistics.median(old) / md:.2f}x)"
        )
        print(
            f"  {name:5s} step min {mn:7.3f} ms, median {md:7.3f} ms; "
            f"prompt catch-up {prompt[name]:8.1f} ms" + ("" if name == "old" else ratio)
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="models/demo/target")
    ap.add_argument("--drafter", default="models/demo/mtp")
    ap.add_argument("--old-rev", default=OLD_REV)
    ap.add_argument("--settings", default="10x2048,1x256", help="requests x context, ...")
    ap.add_argument("--k", type=int, default=3, help="draft steps (the demo's NEXTN default)")
    ap.add_argument("--accept", type=int, default=2, help="tokens committed per step")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per arm and round")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    llm = LLM(args.target, attention_backend="cpp")  # the drafter's products tiled, as served
    spec = SpecConfig("NEXTN", args.drafter, num_steps=args.k)
    llm.engine.set_speculation(*build_speculation(spec, llm.engine))
    module = llm.engine.drafter.module
    old_cls = old_drafter_class(args.old_rev)

    def new(kernel: bool):
        def make() -> MTPDrafter:
            d = MTPDrafter(module, args.k)
            d.kernel = kernel
            return d

        return make

    arms = {"old": lambda: old_cls(module, args.k), "torch": new(False), "cpp": new(True)}
    with torch.inference_mode():
        for setting in args.settings.split(","):
            requests, context = (int(x) for x in setting.split("x"))
            run_setting(arms, module, requests, context, args)


if __name__ == "__main__":
    main()
