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

Accept length, both engines: 1 + accepted draft tokens / verify passes that carried a draft,
the bonus token included; llama.cpp's is its own "#mean acc len" (`-lv 4` prints it), ours
leaves out the prefill pass, which drafts nothing. Acceptance per position k: the share of those
passes in which draft token k was accepted (llama.cpp's "#acc rate/pos").
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from specserve.bench.datasets import domains_in_turn
from specserve.engine.tokenizer import Tokenizer

GENERATED = re.compile(r"n_predict = +(\d+)")
STATS = re.compile(
    r"#gen drafts = +(\d+).*#gen tokens = +(\d+), #acc tokens = +(\d+).*"
    r"#acc rate/pos = \(([\d., ]+)\)"
)


@dataclass(frozen=True)
class Rounds:
    """Verify passes that carried a draft: how many, tokens drafted, draft tokens accepted,
    and in how many of them draft token k was accepted."""

    passes: int
    drafted: int
    accepted: int
    per_position: tuple[int, ...]

    @property
    def accept_length(self) -> float:
        return 1 + self.accepted / max(1, self.passes)

    @property
    def accept_rate(self) -> float:
        return self.accepted / max(1, self.drafted)

    def position_rates(self) -> str:
        return " ".join(f"{n / max(1, self.passes):.2f}" for n in self.per_position)

    def __add__(self, other: Rounds) -> Rounds:
        k = max(len(self.per_position), len(other.per_position))
        a, b = (r.per_position + (0,) * (k - len(r.per_position)) for r in (self, other))
        return Rounds(
            self.passes + other.passes,
            self.drafted + other.drafted,
            self.accepted + other.accepted,
            tuple(x + y for x, y in zip(a, b, strict=True)),
        )


NO_ROUNDS = Rounds(0, 0, 0, ())


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
    """From the statistics line of llama.cpp's speculative decoder."""
    found = STATS.search(log)
    if found is None:
        raise ValueError("no '#gen drafts ... #acc rate/pos' statistics (run it with -lv 4)")
    passes, drafted, accepted = map(int, found.groups()[:3])
    rates = [float(x) for x in found.group(4).split(",")]
    return Rounds(passes, drafted, accepted, tuple(round(r * passes) for r in rates))


def specserve_rounds(meta: dict) -> Rounds:
    """From a request's meta_info; hist[a] counts the passes that accepted a draft tokens."""
    hist = meta.get("spec_accept_histogram", [])
    per_position = tuple(sum(hist[k + 1 :]) for k in range(len(hist) - 1))
    accepted = sum(a * n for a, n in enumerate(hist))
    return Rounds(sum(hist), meta.get("spec_draft_token_num", 0), accepted, per_position)


def ours(bundle: Path, prompts: list[list[int]], lengths: list[int], threads: int) -> list:
    """Greedy DSPARK decodes of `prompts`, `lengths` tokens each, one at a time."""
    from specserve.config import SpecConfig
    from specserve.core import SamplingParams
    from specserve.llm import LLM
    from specserve.speculative.factory import build_speculation

    longest = max(map(len, prompts)) + max(lengths) + 64
    llm = LLM(str(bundle / "target"), max_total_tokens=longest, num_threads=threads)
    # the drafter's accept length, so every step drafts: no draft gate (it pauses drafting
    # where it does not pay on this machine, which llama.cpp does not)
    spec = SpecConfig(
        "DSPARK", str(bundle / "dspark"), verify_policy="full", adaptive_drafting=False
    )
    llm.engine.set_speculation(*build_speculation(spec, llm.engine))
    return [
        llm.generate(ids, SamplingParams(max_tokens=n, temperature=0))[0]
        for ids, n in zip(prompts, lengths, strict=True)
    ]


def report(bundle: Path, work: Path, n_predict: int, threads: int) -> None:
    prompts = json.loads((work / "prompts.json").read_text())
    logs = [(work / f"decode_{i}.log").read_text() for i in range(1, len(prompts) + 1)]
    # llama.cpp drafts whole blocks up to the end, so it passes -n by up to a block; we decode
    # as many tokens as it did, so that both end on the same pass
    lengths = [int(m.group(1)) if (m := GENERATED.search(log)) else n_predict for log in logs]
    tok = Tokenizer(bundle / "target")
    total_l, total_o = NO_ROUNDS, NO_ROUNDS
    same = 0
    print(f"{'prompt':>6} {'llama.cpp tau':>13} {'specserve tau':>13} {'same greedy text':>16}")
    for i, out in enumerate(ours(bundle, prompts, lengths, threads), 1):
        theirs = llamacpp_rounds(logs[i - 1])
        mine, ids = specserve_rounds(out.meta_info[0]), out.outputs[0].token_ids
        # llama.cpp prints the prompt, then what it generated (one token past -n)
        # the model may generate a byte-level token that ends mid-character: both sides
        # decode invalid UTF-8 to U+FFFD, as the tokenizers library does
        text = (work / f"decode_{i}.out").read_text(errors="replace").lstrip("\n")
        prompt_text = (work / f"prompt_{i}.txt").read_text()
        generated = text[len(prompt_text) :] if text.startswith(prompt_text) else None
        # over the -n tokens asked for: llama.cpp's printout now and then lacks its last token
        match = generated is not None and generated.startswith(tok.decode(ids[:n_predict]))
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
                ("accept_per_position", r.position_rates()),
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
