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
    """Every step in order; each is skipped when its result exists."""
    target = build_target(out, work, device)
    build_data(work, target, device)
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
    from specserve.train.bundle_readme import write_readme

    write_readme(out, results)
    log(f"done: {out}")


def _domains(work: Path) -> list[str]:
    return [str(work / "corpus" / "code"), str(work / "corpus" / "prose")]


def build_target(out: Path, work: Path, device: str) -> Path:
    """Corpus, tokenizer, the pre-trained target, exported into the bundle -> its folder."""
    corpus, tok = work / "corpus", work / "tokenizer"
    domains = _domains(work)
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
    return target


def build_data(work: Path, target: Path, device: str) -> None:
    """Train and held-out prompts, and the target's continuations of them (`DATA_SETS`)."""
    domains, tok = _domains(work), work / "tokenizer"
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
    from specserve.speculative.handle import TargetHandle
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
    drafter = load_drafter(out / alg, TargetHandle.of(target))
    offline = evaluate_sequences(target, drafter, alg, seqs, p, k, 0.0)
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
    from specserve.speculative.handle import TargetHandle

    target, cfg = load_model(out / "target")
    v, h = cfg.vocab_size, cfg.hidden_size
    body = sum(p.numel() for n, p in target.named_parameters() if ".layers." in n)
    costs = {"target": body + v * h}
    for alg in DRAFTER_ARGS:
        d = load_drafter(out / alg, TargetHandle.of(target))
        own = sum(p.numel() for n, p in d.named_parameters() if n.startswith(PER_POSITION))
        costs[alg] = own + v * h  # its own per-position weights and the shared LM head
    return costs | {f"target/{alg}": round(costs["target"] / costs[alg], 2) for alg in DRAFTER_ARGS}


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
