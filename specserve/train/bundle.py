"""Rebuild the demo bundle from scratch: `python -m specserve.train.bundle --out models/demo`.

Every step writes its result under `--work` (default `build/demo`) and is skipped when that
result exists, and the long ones checkpoint, so an interrupted build resumes where it stopped.
The bundle (`--out`) gets the target (float16 on disk), the three drafters, the DSpark STS
temperatures, `eval.json` and a README with the evaluation tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TARGET_RUN = {
    "model": {
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
    },
    "train": {
        "steps": 700,
        "batch_size": 8,
        "seq_len": 256,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup": 30,
        "checkpoint_minutes": 3.0,
    },
    "max_bytes_per_corpus": 6 << 20,
}
VOCAB_SIZE = 2048
PROMPT_LEN, NEW_TOKENS = 64, 96
TRAIN_PROMPTS, HELDOUT_PROMPTS = 1000, 48  # per domain
# (folder, prompts, temperature): the drafters train on both a sampled and a greedy
# continuation of every training prompt, as they are evaluated (and served) at both
# temperatures; the held-out continuations are regenerated at each evaluation temperature.
DATA_SETS = [
    ("data_train", "train", 1.0),
    ("data_train_greedy", "train", 0.0),
    ("data_heldout", "heldout", 1.0),
]
TRAIN_DATA = [name for name, split, _ in DATA_SETS if split == "train"]
ENGINE_CHECK_PROMPTS = 8  # per domain: greedy tau through the serving engine
ANCHORS = 48  # of the 96 generated positions of a sequence, drafted as packed blocks per step
DRAFTER_ARGS = {
    "mtp": ["--mtp-depth", "3"],
    "dflash": ["--block-size", "7", "--anchors-per-seq", str(ANCHORS), "--loss-decay-gamma", "4"],
    "dspark": [
        *("--block-size", "7", "--anchors-per-seq", str(ANCHORS), "--loss-decay-gamma", "4"),
        *("--markov-rank", "128", "--markov-head-type", "vanilla"),
    ],
}
# About the same wall-clock budget each (16-20 min of steps on one thread, plus ~3 min for the
# one-time target pass): an MTP step covers every position of a sequence at three depths.
DRAFTER_STEPS = {"mtp": 1150, "dflash": 1200, "dspark": 1200}
EVAL_RUNS = [("mtp", 1), ("mtp", 3), ("dflash", 7), ("dspark", 7)]


def log(msg: str) -> None:
    print(f"[bundle {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(*args: str, threads: int = 1) -> list[str]:
    return [sys.executable, "-m", "specserve", *args, "--threads", str(threads)]


def run(cmd: list[str]) -> None:
    log(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True)


def build(out: Path, work: Path, jobs: int, device: str) -> None:
    corpus, tok = work / "corpus", work / "tokenizer"
    domains = [str(corpus / "code"), str(corpus / "prose")]
    if not (corpus / "prose").is_dir():
        subprocess.run(
            [sys.executable, "-m", "specserve", "train", "corpus", "--out", str(corpus)], check=True
        )
    if not (tok / "tokenizer.json").is_file():
        run(
            cli(
                "train",
                "tokenizer",
                "--corpus",
                *domains,
                "--vocab-size",
                str(VOCAB_SIZE),
                "--out",
                str(tok),
            )
        )
    run_cfg = work / "target.json"
    run_cfg.write_text(json.dumps(TARGET_RUN, indent=2) + "\n")
    if not (work / "target" / "model.safetensors").is_file():
        run(
            cli(
                "train",
                "target",
                "--corpus",
                *domains,
                "--tokenizer",
                str(tok),
                "--config",
                str(run_cfg),
                "--out",
                str(work / "target"),
                "--resume",
                "--device",
                device,
            )
        )
    target = out / "target"
    if not (target / "model.safetensors").is_file():
        export_target(work / "target", target, run_cfg)
    for split, n in (("train", TRAIN_PROMPTS), ("heldout", HELDOUT_PROMPTS)):
        prompts = work / f"prompts_{split}.jsonl"
        if not prompts.is_file():
            run(
                cli(
                    "train",
                    "prompts",
                    "--corpus",
                    *domains,
                    "--tokenizer",
                    str(tok),
                    "--split",
                    split,
                    "--per-corpus",
                    str(n),
                    "--prompt-len",
                    str(PROMPT_LEN),
                    "--out",
                    str(prompts),
                )
            )
    for name, split, temp in DATA_SETS:
        if not (work / name / "data.pt").is_file():
            run(
                cli(
                    "train",
                    "gen-data",
                    "--target",
                    str(target),
                    "--prompts",
                    str(work / f"prompts_{split}.jsonl"),
                    "--out",
                    str(work / name),
                    "--prompt-len",
                    str(PROMPT_LEN),
                    "--max-new-tokens",
                    str(NEW_TOKENS),
                    "--temperature",
                    str(temp),
                    "--device",
                    device,
                )
            )
    train_drafters(out, work, jobs, device)
    if not (out / "dspark" / "sts.json").is_file():
        run(
            cli(
                "train",
                "calibrate",
                "--drafter",
                str(out / "dspark"),
                "--data",
                str(work / "data_heldout"),
                "--target",
                str(target),
                "--device",
                device,
            )
        )
    results = evaluate_all(out, work, device)
    write_readme(out, work, results)
    log(f"done: {out}")


def export_target(src: Path, dst: Path, run_cfg: Path) -> None:
    """The trained target, float16 on disk (it loads back to float32)."""
    from specserve.models.loader import load_model
    from specserve.train.target import copy_tokenizer, save_hf

    model, cfg = load_model(src)
    save_hf(model, {k: v for k, v in cfg.raw.items() if k != "torch_dtype"}, dst, "float16")
    copy_tokenizer(src, dst)
    shutil.copy(src / "train_log.json", dst / "train_log.json")
    shutil.copy(run_cfg, dst / "train_config.json")


def train_drafters(out: Path, work: Path, jobs: int, device: str) -> None:
    """Train the missing drafters, `jobs` at a time, each on one thread; copy them to `out`."""
    todo = [alg for alg in DRAFTER_ARGS if not (out / alg / "model.safetensors").is_file()]
    running: list[tuple[str, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < jobs:
            alg = todo.pop(0)
            cmd = cli(
                "train",
                "drafter",
                "--algorithm",
                alg,
                "--target",
                str(out / "target"),
                "--data",
                *(str(work / name) for name in TRAIN_DATA),
                "--out",
                str(work / alg),
                "--cache-target-states",
                "--steps",
                str(DRAFTER_STEPS[alg]),
                "--resume",
                "--device",
                device,
                *DRAFTER_ARGS[alg],
            )
            log(" ".join(cmd[2:]))
            logf = open(work / f"{alg}.log", "a")  # noqa: SIM115
            running.append((alg, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)))
        time.sleep(5)
        for alg, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((alg, proc))
            if proc.returncode:
                raise SystemExit(f"drafter {alg} failed; see {work / (alg + '.log')}")
            (out / alg).mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "model.safetensors", "train_log.json"):
                shutil.copy(work / alg / name, out / alg / name)


def evaluate_all(out: Path, work: Path, device: str) -> dict:
    from specserve.train.evaluate import evaluate_drafter

    path = out / "eval.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for temp in (0.0, 1.0):
        for alg, k in EVAL_RUNS:
            key = f"{alg}-{k}@t{temp:g}"
            if key in results:
                continue
            log(f"eval {key}")
            t0 = time.monotonic()
            results[key] = evaluate_drafter(
                out / "target", out / alg, work / "data_heldout", temp, k, device
            )
            results[key]["seconds"] = round(time.monotonic() - t0, 1)
            path.write_text(json.dumps(results, indent=2) + "\n")
    for alg, k in EVAL_RUNS:
        key = f"{alg}-{k}@engine"
        if key not in results:
            log(f"engine cross-check {key}")
            results[key] = engine_check(out, work, alg, k)
            path.write_text(json.dumps(results, indent=2) + "\n")
    if "cost" not in results:
        results["cost"] = forward_costs(out)
        path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def engine_check(out: Path, work: Path, alg: str, k: int) -> dict:
    """Greedy tau through the engine on the first prompts of each domain, next to the offline
    number for the same prompts."""
    import torch

    from specserve.models.loader import load_model
    from specserve.speculative.checkpoint import load_drafter
    from specserve.train.evaluate import continuations, engine_accept_length, evaluate_sequences

    target, _ = load_model(out / "target")
    seqs, p, domains = continuations(target, work / "data_heldout", 0.0)
    rows = [
        i
        for d in sorted(set(domains))
        for i in [j for j, x in enumerate(domains) if x == d][:ENGINE_CHECK_PROMPTS]
    ]
    seqs = seqs[torch.tensor(rows)]
    prompts = [r[:p].tolist() for r in seqs]
    engine = engine_accept_length(out / "target", out / alg, alg, prompts, k, NEW_TOKENS)
    offline = evaluate_sequences(target, load_drafter(out / alg, target), alg, seqs, p, k, 0.0)
    return {
        "engine_tau": round(engine, 3),
        "offline_tau": round(offline.tau, 3),
        "prompts": len(rows),
    }


# Weights a drafter multiplies once per draft position (the Markov head's W1 is a lookup; fc and
# the context K/V projections run once per committed token).
PER_POSITION = (
    "layers.",
    "eh_proj",
    "markov_head.markov_w2",
    "markov_head.gate_proj",
    "markov_head.joint_proj",
    "confidence_head",
)


def forward_costs(out: Path) -> dict:
    """Multiply-accumulates per token of one forward (target) or one draft position."""
    from specserve.models.loader import load_model
    from specserve.speculative.checkpoint import load_drafter

    target, cfg = load_model(out / "target")
    v, h = cfg.vocab_size, cfg.hidden_size
    body = sum(p.numel() for n, p in target.named_parameters() if ".layers." in n)
    costs = {"target": body + v * h}
    for alg in DRAFTER_ARGS:
        d = load_drafter(out / alg, target)
        own = sum(p.numel() for n, p in d.named_parameters() if n.startswith(PER_POSITION))
        costs[alg] = own + v * h  # its own per-position weights and the shared LM head
    return costs | {f"target/{alg}": round(costs["target"] / costs[alg], 2) for alg in DRAFTER_ARGS}


def _drafter_minutes(log: dict) -> str:
    """Training time of a drafter run: its steps plus the one-time target pass when the run
    recorded it (`state_cache_seconds`)."""
    steps = log["train_seconds"] / 60
    if "state_cache_seconds" not in log:
        return f"{steps:.1f} min"
    return f"{steps + log['state_cache_seconds'] / 60:.1f} min incl. the target pass"


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def write_readme(out: Path, work: Path, results: dict) -> None:
    from specserve.train.drafter import default_layer_ids

    tgt = json.loads((out / "target" / "train_log.json").read_text())
    logs = {a: json.loads((out / a / "train_log.json").read_text()) for a in DRAFTER_ARGS}
    sts = json.loads((out / "dspark" / "sts.json").read_text())
    names = {
        "mtp-1": "MTP (1 step)",
        "mtp-3": "MTP (3 steps)",
        "dflash-7": "DFlash",
        "dspark-7": "DSpark",
    }
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
                f"| {names[f'{alg}-{k}']} | "
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
        lines.append(f"| {names[f'{alg}-{k}']} | {r['engine_tau']:.2f} | {r['offline_tau']:.2f} |")
    lines += [
        "",
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/demo")
    ap.add_argument("--work", default="build/demo", help="intermediate files and checkpoints")
    ap.add_argument("--jobs", type=int, default=3, help="drafters trained at once")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    build(out, work, args.jobs, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
