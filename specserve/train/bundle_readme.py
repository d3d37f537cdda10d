"""The demo bundle's generated README: contents, the target's loss by context position, held-out
tau per context bucket and temperature, the issue's aims checked, the engine cross-check, STS,
stage times and the commands of the build. `notes.md` (hand-written) is kept across rebuilds."""

from __future__ import annotations

import json
from pathlib import Path

from specserve.train.bundle import ALGORITHMS, EVAL_RUNS, TEMPERATURES, Recipe

NAMES = {
    "mtp-1": "MTP (1 step)",
    "mtp-3": "MTP (3 steps)",
    "dflash-7": "DFlash",
    "dspark-7": "DSpark",
}


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _drafter_minutes(log: dict) -> str:
    return f"{log['train_seconds'] / 60:.1f} min"


def write_readme(recipe: Recipe, out: Path, results: dict, stages: dict[str, float]) -> None:
    lines = contents(recipe, out, results) + evaluation(recipe, results)
    notes = out / "notes.md"
    lines += goal_check(recipe, results) + (
        [notes.read_text().rstrip(), ""] if notes.is_file() else []
    )
    lines += engine_and_sts(recipe, out, results) + how_built(recipe, stages)
    (out / "README.md").write_text("\n".join(lines))


def contents(recipe: Recipe, out: Path, results: dict) -> list[str]:
    tgt = json.loads((out / "target" / "train_log.json").read_text())
    logs = {a: json.loads((out / a / "train_log.json").read_text()) for a in ALGORITHMS}
    m, t = recipe.model, recipe.target_train
    lines = [
        "# Demo bundle",
        "",
        "A small Qwen3 target and its MTP, DFlash and DSpark drafters, trained by specserve on a",
        "2-core CPU from text that ships with the machine (no download), for contexts of",
        f"{t['seq_len']} tokens. Rebuild it with `make demo-model` (= `python -m "
        "specserve.train.bundle --out models/demo`; resumable).",
        "",
        "## Contents",
        "",
        "| folder | what | params | size on disk | training time |",
        "|---|---|---|---|---|",
        f"| `target/` | Qwen3ForCausalLM, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
        f"vocab {recipe.vocab_size}, trained on {t['seq_len']}-token sequences, "
        f"max_position_embeddings {m['max_position_embeddings']}, float16 on disk | "
        f"{tgt['params'] / 1e6:.2f} M | {_size_mb(out / 'target'):.1f} MB | "
        f"{tgt['train_seconds'] / 60:.1f} min ({tgt['train_tokens'] / 1e6:.2f} M tokens) |",
    ]
    for alg in ALGORITHMS:
        lines.append(
            f"| `{alg}/` | {alg} drafter, 1 layer, shares the target's embedding and LM head, "
            "float16 on disk | "
            f"{logs[alg]['params'] / 1e6:.2f} M | {_size_mb(out / alg):.1f} MB | "
            f"{_drafter_minutes(logs[alg])}, {recipe.drafter_steps[alg]} steps |"
        )
    cost = results["cost"]
    edges = recipe.position_edges
    buckets = [f"{lo}-{hi}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    lines += [
        "",
        f"Total size: {_size_mb(out):.1f} MB. Multiply-accumulates per token of one forward "
        "(target: all layers and the LM head; drafter: per draft position, its layer, Markov W2 "
        f"and the shared LM head): target {cost['target'] / 1e6:.2f} M; "
        + ", ".join(
            f"{a} {cost[a] / 1e6:.2f} M ({cost['target/' + a]}x cheaper)" for a in ALGORITHMS
        )
        + ".",
        "",
        "Held-out LM loss of the target (nats/token) on whole held-out files, by the position of",
        "the predicted token:",
        "",
        "| domain | " + " | ".join(buckets) + " |",
        "|---|" + "---|" * len(buckets),
    ]
    for dom, row in results["position_loss"].items():
        lines.append(f"| {dom} | " + " | ".join(_num(row[b]) for b in buckets) + " |")
    return lines + [""]


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def evaluation(recipe: Recipe, results: dict) -> list[str]:
    lines = [
        "## Evaluation (held-out prompts)",
        "",
        f"Prompts per domain and context bucket: {dict(zip(recipe.eval_lens, recipe.heldout_prompts, strict=True))}",
        f"({min(recipe.eval_lens)} tokens: windows of held-out files; longer: the first tokens of",
        "whole held-out files, one file each). Neither the tokenizer, the target nor a drafter saw",
        f"these files. The target continues each prompt for {recipe.new_tokens} tokens; accept",
        "length tau counts the bonus token (`specserve eval drafter`, offline).",
        "",
    ]
    for temp in TEMPERATURES:
        for ctx in recipe.eval_lens:
            doms = list(results[f"dspark-7@t{temp:g}@{ctx}"]["domains"])
            lines += [
                f"### Temperature {temp:g}, context {ctx}",
                "",
                "| drafter | "
                + " | ".join(f"tau {d}" for d in doms)
                + " | accept rate per position (all, conditional) |",
                "|---|" + "---|" * (len(doms) + 1),
            ]
            for alg, k in EVAL_RUNS:
                r = results[f"{alg}-{k}@t{temp:g}@{ctx}"]["domains"]
                cond = " ".join(f"{x:.2f}" for x in r["all"]["conditional"])
                taus = " | ".join(f"{r[d]['tau']:.2f}" for d in doms)
                lines.append(f"| {NAMES[f'{alg}-{k}']} | {taus} | {cond} |")
            lines.append("")
    return lines


def goal_check(recipe: Recipe, results: dict) -> list[str]:
    """The issue's offline aims, checked against the measured numbers (met or not)."""
    lo, hi = min(recipe.eval_lens), max(recipe.eval_lens)
    out = ["Aims of the issue, as measured (block 7, all domains):", ""]
    for temp in TEMPERATURES:
        for ctx in recipe.eval_lens:
            tau = {
                a: results[f"{a}-{k}@t{temp:g}@{ctx}"]["domains"]["all"]["tau"]
                for a, k in EVAL_RUNS
                if k != 1
            }
            sp, fl, mt = tau["dspark"], tau["dflash"], tau["mtp"]
            out.append(
                f"* t={temp:g} context {ctx}: DSpark {sp:.2f} > DFlash {fl:.2f} > MTP-3 {mt:.2f}: "
                f"{_met(sp > fl > mt)}; DSpark/DFlash = {sp / fl:.2f}x (aim 1.16x: {_met(sp >= 1.16 * fl)})"
            )
    for alg, k in (("dspark", 7), ("mtp", 3)):
        a = results[f"{alg}-{k}@t0@{hi}"]["domains"]["all"]["tau"]
        b = results[f"{alg}-{k}@t0@{lo}"]["domains"]["all"]["tau"]
        out.append(
            f"* t=0 {alg}: tau at context {hi} {a:.2f} vs {b:.2f} at {lo} = {a / b:.2f}x "
            f"(aim 0.9x: {_met(a >= 0.9 * b)})"
        )
    return out + [""]


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def engine_and_sts(recipe: Recipe, out: Path, results: dict) -> list[str]:
    sts = json.loads((out / "dspark" / "sts.json").read_text())
    lines = [
        "Cross-check through the serving engine (`LLM` + `--speculative-*`, greedy, verify policy",
        f"full) on the first {recipe.engine_check_prompts} held-out prompts of each domain at context",
        f"{min(recipe.eval_lens)}, next to the offline number for the same prompts:",
        "",
        "| drafter | engine tau | offline tau |",
        "|---|---|---|",
    ]
    for alg, k in EVAL_RUNS:
        r = results[f"{alg}-{k}@engine"]
        lines.append(f"| {NAMES[f'{alg}-{k}']} | {r['engine_tau']:.2f} | {r['offline_tau']:.2f} |")
    n = len(sts["temperatures"])
    return lines + [
        "",
        "## DSpark confidence calibration (STS)",
        "",
        "Fitted on every other held-out sequence (both domains) at temperature 1, ECE of the",
        "survival probability per position reported on the rest:",
        "",
        "| position | " + " | ".join(str(i + 1) for i in range(n)) + " |",
        "|---|" + "---|" * n,
        "| temperature | " + " | ".join(f"{t:.2f}" for t in sts["temperatures"]) + " |",
        "| ECE before | " + " | ".join(f"{e:.3f}" for e in sts["ece_before"]) + " |",
        "| ECE after | " + " | ".join(f"{e:.3f}" for e in sts["ece_after"]) + " |",
        "",
    ]


def how_built(recipe: Recipe, stages: dict[str, float]) -> list[str]:
    spread = ", ".join(
        f"{n} x {p}" for n, p in zip(recipe.train_prompts, recipe.prompt_lens, strict=True)
    )
    return [
        "## How it was built",
        "",
        "`python -m specserve.train.bundle --out models/demo` (stages resume; `--estimate` times",
        "full-size steps first and predicts each stage). Wall-clock seconds per stage of this build:",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.0f} |" for k, v in stages.items()),
        "",
        *(
            [
                "A later run of the build re-evaluated the models already in the bundle (it",
                "trains nothing that exists); a stage it ran again shows that run's time, and",
                "`gen-data-heldout` is its held-out continuations alone.",
                "",
            ]
            if "gen-data-heldout" in stages
            else []
        ),
        *_target_recipe(recipe),
        f"* Drafter data: prompts per domain (count x tokens) {spread}, windows of whole training",
        f"  files, each continued by the target for {recipe.new_tokens} tokens once sampled (t=1)",
        "  and once greedy; the target's states computed once (`specserve train cache-target`)",
        "  and shared by the three drafters; batches hold one prompt length.",
        f"* Every drafter: 1 transformer layer, frozen shared embedding / LM head, AdamW, batch "
        f"{recipe.drafter_batch};",
        f"  DFlash/DSpark: {recipe.anchors} random anchors per sequence, block 7, position weights",
        f"  exp(-(k-1)/4), target layers {list(recipe.target_layer_ids)} as context (never the last",
        "  layer); DSpark loss 0.1 CE + 0.9 TV + 1.0 BCE, Markov rank 128; DFlash and MTP",
        "  0.1 CE + 0.9 TV (MTP chained 3 steps). Training logs are in each `train_log.json`.",
        "",
    ]


def _target_recipe(recipe: Recipe) -> list[str]:
    t, w = recipe.target_train, recipe.target_warmup
    long = f"{t['steps']} steps of {t['batch_size']} x {t['seq_len']} tokens"
    if not w:
        return [
            f"* Target: {long} (packed whole files of the train split), AdamW, warm-up then",
            "  cosine decay.",
        ]
    return [
        f"* Target, a curriculum: {w['steps']} steps of {w['batch_size']} x {w['seq_len']} tokens,",
        f"  then {long} from those weights (packed whole files of the train split), AdamW,",
        f"  warm-up then cosine decay in each phase (peak lr {w.get('lr')}, then {t.get('lr')}).",
    ]
