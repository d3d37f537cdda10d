"""The demo bundle's README: contents, evaluation tables, calibration and the recipe, written
from the build's logs and results (`specserve.train.bundle` calls `write_readme` last)."""

from __future__ import annotations

import json
from pathlib import Path

from specserve.train.bundle import (
    ANCHORS,
    DRAFTER_ARGS,
    DRAFTER_STEPS,
    ENGINE_CHECK_PROMPTS,
    EVAL_RUNS,
    HELDOUT_PROMPTS,
    NEW_TOKENS,
    PROMPT_LEN,
    TARGET_RUN,
    TRAIN_DATA,
    TRAIN_PROMPTS,
    VOCAB_SIZE,
)

NAMES = {
    "mtp-1": "MTP (1 step)",
    "mtp-3": "MTP (3 steps)",
    "dflash-7": "DFlash",
    "dspark-7": "DSpark",
}


def _drafter_minutes(log: dict) -> str:
    """Training time of a drafter run: its steps plus the one-time target pass when the run
    recorded it (`state_cache_seconds`)."""
    steps = log["train_seconds"] / 60
    if "state_cache_seconds" not in log:
        return f"{steps:.1f} min"
    return f"{steps + log['state_cache_seconds'] / 60:.1f} min incl. the target pass"


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _contents(out: Path, results: dict) -> list[str]:
    """Title, what each folder holds, sizes, times and forward costs."""
    tgt = json.loads((out / "target" / "train_log.json").read_text())
    logs = {a: json.loads((out / a / "train_log.json").read_text()) for a in DRAFTER_ARGS}
    lines = [
        "# Demo bundle",
        "",
        "A small Qwen3 target and its MTP, DFlash and DSpark drafters, trained by specserve on a",
        "2-core CPU from text that ships with the machine (no download). Rebuild it with",
        "`make demo-model` (= `python -m specserve.train.bundle --out models/demo`; resumable).",
        "",
        "## Contents",
        "",
        "| folder | what | params | size on disk | training time |",
        "|---|---|---|---|---|",
        f"| `target/` | Qwen3ForCausalLM, {TARGET_RUN['model']['num_hidden_layers']} layers, hidden "
        f"{TARGET_RUN['model']['hidden_size']}, vocab {VOCAB_SIZE}, float16 on disk | "
        f"{tgt['params'] / 1e6:.2f} M | {_size_mb(out / 'target'):.1f} MB | "
        f"{tgt['train_seconds'] / 60:.1f} min ({tgt['train_tokens'] / 1e6:.2f} M tokens) |",
    ]
    for alg in DRAFTER_ARGS:
        lines.append(
            f"| `{alg}/` | {alg} drafter, 1 layer, shares the target's embedding and LM head | "
            f"{logs[alg]['params'] / 1e6:.2f} M | {_size_mb(out / alg):.1f} MB | "
            f"{_drafter_minutes(logs[alg])}, {DRAFTER_STEPS[alg]} steps |"
        )
    cost = results["cost"]
    lines += [
        "",
        f"Total size: {_size_mb(out):.1f} MB. Held-out LM loss of the target (nats/token): "
        + ", ".join(f"{d} {v}" for d, v in tgt["heldout_loss"].items())
        + ". Multiply-accumulates per token of one forward (target: all layers and the LM head;"
        + " drafter: per draft position, its layer, Markov W2 and the shared LM head): target "
        + f"{cost['target'] / 1e6:.2f} M; "
        + ", ".join(
            f"{a} {cost[a] / 1e6:.2f} M ({cost['target/' + a]}x cheaper)" for a in DRAFTER_ARGS
        )
        + ".",
        "",
    ]
    return lines


def _evaluation(out: Path, results: dict) -> list[str]:
    """Offline tau tables per temperature, the aims, hand-written notes, the engine cross-check."""
    lines = [
        "## Evaluation (held-out prompts)",
        "",
        f"{HELDOUT_PROMPTS} held-out prompts per domain ({PROMPT_LEN} tokens, cut from files that",
        "neither the tokenizer, the target nor a drafter saw), continued by the target for",
        f"{NEW_TOKENS} tokens. Accept length tau counts the bonus token. `specserve eval drafter`",
        "computes it offline (see `specserve/train/evaluate.py`).",
        "",
    ]
    for temp in (0.0, 1.0):
        doms = [d for d in results[f"dspark-7@t{temp:g}"]["domains"]]
        lines += [
            f"### Temperature {temp:g}",
            "",
            "| drafter | "
            + " | ".join(f"tau {d}" for d in doms)
            + " | accept rate per position (all, conditional on earlier ones) |",
            "|---|" + "---|" * (len(doms) + 1),
        ]
        for alg, k in EVAL_RUNS:
            r = results[f"{alg}-{k}@t{temp:g}"]["domains"]
            cond = " ".join(f"{x:.2f}" for x in r["all"]["conditional"])
            lines.append(
                f"| {NAMES[f'{alg}-{k}']} | "
                + " | ".join(f"{r[d]['tau']:.2f}" for d in doms)
                + f" | {cond} |"
            )
        lines.append("")
    notes = out / "notes.md"  # hand-written remarks on this build's numbers, kept on rebuilds
    lines += goal_check(results) + ([notes.read_text().rstrip(), ""] if notes.is_file() else [])
    lines += [
        "Cross-check through the serving engine (`LLM` + `--speculative-*`, greedy, verify policy",
        f"full) on the first {ENGINE_CHECK_PROMPTS} held-out prompts of each domain, next to the",
        "offline number for the same prompts:",
        "",
        "| drafter | engine tau | offline tau |",
        "|---|---|---|",
    ]
    for alg, k in EVAL_RUNS:
        r = results[f"{alg}-{k}@engine"]
        lines.append(f"| {NAMES[f'{alg}-{k}']} | {r['engine_tau']:.2f} | {r['offline_tau']:.2f} |")
    return lines + [""]


def _calibration(out: Path) -> list[str]:
    sts = json.loads((out / "dspark" / "sts.json").read_text())
    return [
        "## DSpark confidence calibration (STS)",
        "",
        "Fitted on half of the held-out sequences at temperature 1, ECE of the survival",
        "probability per position reported on the other half:",
        "",
        "| position | " + " | ".join(str(i + 1) for i in range(len(sts["temperatures"]))) + " |",
        "|---|" + "---|" * len(sts["temperatures"]),
        "| temperature | " + " | ".join(f"{t:.2f}" for t in sts["temperatures"]) + " |",
        "| ECE before | " + " | ".join(f"{e:.3f}" for e in sts["ece_before"]) + " |",
        "| ECE after | " + " | ".join(f"{e:.3f}" for e in sts["ece_after"]) + " |",
        "",
    ]


def _recipe() -> list[str]:
    """The commands that built the bundle and the training settings."""
    from specserve.train.drafter import default_layer_ids

    lines = [
        "## How it was built",
        "",
        "```",
        "specserve train corpus --out build/demo/corpus      # stdlib .py (code), man pages (prose)",
        f"specserve train tokenizer --corpus build/demo/corpus/code build/demo/corpus/prose --vocab-size {VOCAB_SIZE} --out build/demo/tokenizer",
        "specserve train target --corpus ... --tokenizer build/demo/tokenizer --config target/train_config.json --out build/demo/target --resume",
        f"specserve train prompts --corpus ... --tokenizer build/demo/tokenizer --split train --per-corpus {TRAIN_PROMPTS} --out build/demo/prompts_train.jsonl",
        "specserve train gen-data --target models/demo/target --prompts build/demo/prompts_train.jsonl --out build/demo/data_train --temperature 1",
        "specserve train gen-data --target models/demo/target --prompts build/demo/prompts_train.jsonl --out build/demo/data_train_greedy --temperature 0",
        f"specserve train prompts ... --split heldout --per-corpus {HELDOUT_PROMPTS} --out build/demo/prompts_heldout.jsonl",
        "specserve train gen-data --target models/demo/target --prompts build/demo/prompts_heldout.jsonl --out build/demo/data_heldout",
    ]
    for alg, extra in DRAFTER_ARGS.items():
        lines.append(
            f"specserve train drafter --algorithm {alg} --target models/demo/target "
            f"--data {' '.join('build/demo/' + n for n in TRAIN_DATA)} --out build/demo/{alg} "
            f"--cache-target-states --steps {DRAFTER_STEPS[alg]} {' '.join(extra)}"
        )
    lines += [
        "specserve train calibrate --drafter models/demo/dspark --data build/demo/data_heldout",
        "specserve eval drafter --target models/demo/target --drafter models/demo/dspark --data build/demo/data_heldout --temperature 0",
        "```",
        "",
        "Every drafter: 1 transformer layer, frozen shared embedding / LM head, AdamW, batch 16",
        "target-generated sequences (64-token prompt + 96 tokens; half sampled at temperature 1,",
        "half greedy, 4000 in all), target states computed once (`--cache-target-states`);",
        f"DFlash/DSpark: {ANCHORS} random anchors per sequence, position weights exp(-(k-1)/4),",
        f"target layers {list(default_layer_ids(TARGET_RUN['model']['num_hidden_layers']))} "
        "as context; DSpark loss 0.1 CE + 0.9 TV + 1.0 BCE, DFlash and",
        "MTP 0.1 CE + 0.9 TV (MTP chained 3 steps). Training logs are in each `train_log.json`.",
        "",
    ]
    return lines


def write_readme(out: Path, results: dict) -> None:
    """The bundle's README.md from the build's logs and `results` (evaluation, costs)."""
    lines = _contents(out, results) + _evaluation(out, results) + _calibration(out) + _recipe()
    (out / "README.md").write_text("\n".join(lines))


def goal_check(results: dict) -> list[str]:
    """The issue's targets, checked against the measured numbers (met or not)."""
    out = ["Targets of the issue, as measured (block 7):", ""]
    for temp in (0.0, 1.0):
        tau = {a: results[f"{a}-{k}@t{temp:g}"]["domains"] for a, k in EVAL_RUNS if k != 1}
        for dom in ("code", "prose"):
            sp, fl, mt = (tau[a][dom]["tau"] for a in ("dspark", "dflash", "mtp"))
            order = sp > fl > mt
            out.append(
                f"* t={temp:g} {dom}: DSpark {sp:.2f} > DFlash {fl:.2f} > MTP-3 {mt:.2f}: "
                f"{'met' if order else 'NOT met'}; DSpark/DFlash = {sp / fl:.2f}x "
                f"(aim 1.16x: {'met' if sp >= 1.16 * fl else 'NOT met'})"
            )
        for alg in ("dspark", "dflash", "mtp"):
            c, p = tau[alg]["code"]["tau"], tau[alg]["prose"]["tau"]
            out.append(
                f"* t={temp:g} {alg}: tau(code) {c:.2f} > tau(prose) {p:.2f}: "
                f"{'met' if c > p else 'NOT met'}"
            )
    return out + [""]
