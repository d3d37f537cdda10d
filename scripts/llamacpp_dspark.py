"""Helper of scripts/llamacpp-dspark.sh: prompts for llama.cpp, and its accept length next to ours.

    python scripts/llamacpp_dspark.py check BUNDLE
    python scripts/llamacpp_dspark.py prompts BUNDLE WORK CONTEXT N
    python scripts/llamacpp_dspark.py report BUNDLE WORK N_PREDICT THREADS

`prompts` writes WORK/prompt_<i>.txt (the text llama.cpp reads) and WORK/prompts.json (their
token ids): held-out prompts of the bundle, code and prose in turn, CONTEXT tokens each (64:
windows of held-out files; longer: the first tokens of whole held-out files). `report` reads
llama.cpp's logs WORK/decode_<i>.{out,log} (`llama-speculative-simple -lv 4`), decodes the same
ids greedily with specserve (DSPARK, the bundle's drafter, every drafted token verified, as
llama.cpp does), and prints both accept lengths.

Accept length, both engines: 1 + accepted draft tokens / verify passes that carried a draft
(the bonus token included; passes without a draft, such as llama.cpp's last one at the token
limit and our prefill, are left out).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from specserve.bench.datasets import domains_in_turn
from specserve.engine.tokenizer import Tokenizer

ROUND = re.compile(r"accepted (\d+)/(\d+) draft tokens")


@dataclass(frozen=True)
class Rounds:
    """Verify passes that carried a draft: how many, tokens drafted, draft tokens accepted."""

    passes: int
    drafted: int
    accepted: int

    @property
    def accept_length(self) -> float:
        return 1 + self.accepted / max(1, self.passes)

    @property
    def accept_rate(self) -> float:
        return self.accepted / max(1, self.drafted)

    def __add__(self, other: Rounds) -> Rounds:
        return Rounds(
            self.passes + other.passes,
            self.drafted + other.drafted,
            self.accepted + other.accepted,
        )


def check(bundle: Path) -> None:
    """Refuse a drafter that reads the target's last layer: llama.cpp extracts the input of
    layer id + 1, which does not exist for the last layer (GGML_ASSERT "layer input tensor is
    null" at the first draft)."""
    target = json.loads((bundle / "target" / "config.json").read_text())
    drafter = json.loads((bundle / "dspark" / "config.json").read_text())
    last, ids = target["num_hidden_layers"] - 1, drafter["target_layer_ids"]
    if last in ids:
        sys.exit(
            f"llamacpp-dspark: the drafter reads layer {last}, the target's last "
            f"(target_layer_ids {ids}); llama.cpp aborts on it. Rebuild the bundle "
            "(make demo-model)."
        )


def write_prompts(bundle: Path, work: Path, context: int, n: int) -> None:
    name = "prompts_heldout.jsonl" if context <= 64 else "prompts_long.jsonl"
    tok = Tokenizer(bundle / "target")
    chosen = []
    for ids in domains_in_turn(bundle / name, context):
        text = tok.decode(ids, skip_special_tokens=False)
        if tok.encode(text) == ids:  # a window cut inside a character does not round-trip
            chosen.append(ids)
            (work / f"prompt_{len(chosen)}.txt").write_text(text)
        if len(chosen) == n:
            break
    if len(chosen) < n:
        sys.exit(f"llamacpp-dspark: only {len(chosen)} prompts of {context} tokens in {name}")
    (work / "prompts.json").write_text(json.dumps(chosen))


def llamacpp_rounds(log: str) -> Rounds:
    pairs = [(int(a), int(d)) for a, d in ROUND.findall(log) if int(d) > 0]
    if not pairs:
        raise ValueError("no 'accepted a/d draft tokens' lines (was it run with -lv 4?)")
    return Rounds(len(pairs), sum(d for _, d in pairs), sum(a for a, _ in pairs))


def ours(bundle: Path, prompts: list[list[int]], n_predict: int, threads: int) -> list:
    from specserve.config import SpecConfig
    from specserve.core import SamplingParams
    from specserve.llm import LLM
    from specserve.speculative.factory import build_speculation

    longest = max(map(len, prompts)) + n_predict + 64
    llm = LLM(str(bundle / "target"), max_total_tokens=longest, num_threads=threads)
    spec = SpecConfig("DSPARK", str(bundle / "dspark"), verify_policy="full")
    llm.engine.set_speculation(*build_speculation(spec, llm.engine))
    params = SamplingParams(max_tokens=n_predict, temperature=0)
    return [llm.generate(ids, params)[0] for ids in prompts]  # one at a time, as llama.cpp


def report(bundle: Path, work: Path, n_predict: int, threads: int) -> None:
    prompts = json.loads((work / "prompts.json").read_text())
    tok = Tokenizer(bundle / "target")
    total_l, total_o = Rounds(0, 0, 0), Rounds(0, 0, 0)
    same = 0
    print(f"{'prompt':>6} {'llama.cpp tau':>13} {'specserve tau':>13} {'same greedy text':>16}")
    for i, out in enumerate(ours(bundle, prompts, n_predict, threads), 1):
        theirs = llamacpp_rounds((work / f"decode_{i}.log").read_text())
        meta, ids = out.meta_info[0], out.outputs[0].token_ids
        hist = meta.get("spec_accept_histogram", [])
        mine = Rounds(sum(hist), meta.get("spec_draft_token_num", 0), sum(
            a * c for a, c in enumerate(hist)))  # fmt: skip
        # llama.cpp prints the prompt, then what it generated (one token past -n)
        text = (work / f"decode_{i}.out").read_text().lstrip("\n")
        prompt_text = (work / f"prompt_{i}.txt").read_text()
        generated = text[len(prompt_text) :] if text.startswith(prompt_text) else None
        match = generated is not None and generated.startswith(tok.decode(ids))
        same += match
        total_l, total_o = total_l + theirs, total_o + mine
        print(f"{i:>6} {theirs.accept_length:>13.2f} {mine.accept_length:>13.2f} {match!s:>16}")
    summary = {
        "prompts": len(prompts),
        "prompt_tokens": len(prompts[0]),
        "n_predict": n_predict,
        "same_greedy_text": same,
        **{
            f"{name}_{key}": value
            for name, r in (("llamacpp", total_l), ("specserve", total_o))
            for key, value in (
                ("accept_length", round(r.accept_length, 3)),
                ("accept_rate", round(r.accept_rate, 3)),
                ("passes", r.passes),
                ("drafted", r.drafted),
                ("accepted", r.accepted),
            )
        },
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def main() -> None:
    cmd, bundle, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    if cmd == "check":
        check(bundle)
    elif cmd == "prompts":
        write_prompts(bundle, Path(rest[0]), int(rest[1]), int(rest[2]))
    elif cmd == "report":
        report(bundle, Path(rest[0]), int(rest[1]), int(rest[2]))
    else:
        sys.exit(f"llamacpp-dspark: unknown step {cmd!r}")


if __name__ == "__main__":
    main()
