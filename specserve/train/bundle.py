"""Rebuild the demo bundle from scratch: `python -m specserve.train.bundle --out models/demo`.

Every stage writes its result under `--work` (default `build/demo`) and is skipped when that
result exists, and the long ones checkpoint, so an interrupted build resumes where it stopped.
Before each stage the build prints its time estimate (from `--estimate`'s measured step
times, when `WORK/step_times.json` exists). The bundle (`--out`) gets the target and the three
drafters (float16 on disk), the DSpark STS temperatures, the held-out prompts, `eval.json` and
a README with the evaluation tables. Models already in `--out` are kept, not trained again: run
on a checkout, the build makes only what evaluating them needs and writes `eval.json` and the
README anew. `--smoke` runs every stage at a tiny scale in a temporary
folder (a check of the pipeline, not a model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """Everything a build decides. Prompt counts are per domain; `train_prompts[i]` prompts of
    `prompt_lens[i]` tokens (windows of whole training files) are continued by the target, once
    sampled (t=1) and once greedy; `eval_lens` are the held-out context buckets (64: windows,
    longer: the first tokens of whole held-out files)."""

    model: dict[str, Any]
    target_train: dict[str, Any]
    max_bytes_per_corpus: int
    corpus_mb: float
    vocab_size: int
    prompt_lens: tuple[int, ...]
    train_prompts: tuple[int, ...]
    new_tokens: int
    eval_lens: tuple[int, ...]
    heldout_prompts: tuple[int, ...]
    drafter_steps: dict[str, int]
    anchors: int
    engine_check_prompts: int
    position_edges: tuple[int, ...]  # held-out LM loss of the target per range of positions
    drafter_batch: int = 16
    # A curriculum: this short-sequence phase first, then `target_train` from its weights.
    target_warmup: dict[str, Any] | None = None
    target_layer_ids: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        from specserve.train.drafter import default_layer_ids

        n = int(self.model["num_hidden_layers"])
        object.__setattr__(self, "target_layer_ids", default_layer_ids(n))  # [1, 4, 6] of 8
        if len(self.prompt_lens) != len(self.train_prompts):
            raise ValueError("recipe: one train_prompts count per prompt length")
        if len(self.eval_lens) != len(self.heldout_prompts):
            raise ValueError("recipe: one heldout_prompts count per eval length")
        if max(self.eval_lens) + self.new_tokens > self.model["max_position_embeddings"]:
            raise ValueError("recipe: the longest eval prompt + new tokens exceed the context")

    @property
    def long_len(self) -> int:
        return max(self.eval_lens)

    def drafter_flags(self, alg: str) -> list[str]:
        ids = [str(i) for i in self.target_layer_ids]
        block = ["--block-size", "7", "--anchors-per-seq", str(self.anchors)]
        return {
            "mtp": ["--mtp-depth", "3"],
            "dflash": [*block, "--loss-decay-gamma", "4", "--target-layer-ids", *ids],
            "dspark": [
                *block,
                *("--loss-decay-gamma", "4", "--target-layer-ids", *ids),
                *("--markov-rank", "128", "--markov-head-type", "vanilla"),
            ],
        }[alg]


FULL = Recipe(
    model={
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 4096,
    },
    # 1.23 M tokens of 256-token sequences (the 256-token build: 700 steps, 1.43 M, train loss
    # 3.9), then 0.49 M of 2,048-token ones from those weights. 200 steps of 4 x 2,048 tokens
    # from scratch (1.64 M tokens) were far too few optimizer steps: loss 5.6 after 155.
    target_warmup={
        "steps": 600,
        "batch_size": 8,
        "seq_len": 256,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup": 30,
        "checkpoint_minutes": 3.0,
    },
    target_train={
        "steps": 60,
        "batch_size": 4,
        "seq_len": 2048,
        "lr": 1e-3,
        "min_lr": 1e-4,
        "warmup": 5,
        "checkpoint_minutes": 3.0,
    },
    max_bytes_per_corpus=6 << 20,
    corpus_mb=24.0,
    vocab_size=2048,
    prompt_lens=(64, 256, 512, 1024, 2048),
    train_prompts=(160, 120, 80, 48, 32),
    new_tokens=96,
    eval_lens=(64, 512, 2048),
    heldout_prompts=(48, 16, 12),
    # About equal wall-clock each (`--estimate`): an MTP step runs its layer over every position
    # of the sequence at three depths, a DFlash/DSpark step only the anchor blocks.
    drafter_steps={"mtp": 200, "dflash": 750, "dspark": 750},
    anchors=48,
    engine_check_prompts=8,
    position_edges=(0, 256, 1024, 2048),
)

SMOKE = Recipe(
    model={
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 4096,
    },
    target_warmup={"steps": 2, "batch_size": 2, "seq_len": 32, "warmup": 1},
    target_train={"steps": 2, "batch_size": 2, "seq_len": 128, "warmup": 1},
    max_bytes_per_corpus=200_000,
    corpus_mb=0.3,
    vocab_size=300,
    prompt_lens=(16, 64),
    train_prompts=(3, 2),
    new_tokens=8,
    eval_lens=(16, 32, 64),
    heldout_prompts=(2, 2, 2),
    drafter_steps={"mtp": 2, "dflash": 2, "dspark": 2},
    anchors=4,
    engine_check_prompts=1,
    position_edges=(0, 16, 32, 64),
    drafter_batch=2,
)

ALGORITHMS = ("mtp", "dflash", "dspark")
EVAL_RUNS = [("mtp", 1), ("mtp", 3), ("dflash", 7), ("dspark", 7)]
TEMPERATURES = (0.0, 1.0)
LONG_PROMPTS = "prompts_long.jsonl"  # whole held-out files cut to the longest eval length
SHORT_PROMPTS = "prompts_heldout.jsonl"  # held-out windows of the shortest eval length
MAX_BUNDLE_MB = 80


def gen_batch(prompt_len: int) -> int:
    """gen-data's batch: about 4K prompt tokens, at least 4 prompts."""
    return max(4, 4096 // prompt_len)


def log(msg: str) -> None:
    print(f"[bundle {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(*args: str, threads: int = 1) -> list[str]:
    return [sys.executable, "-m", "specserve", *args, "--threads", str(threads)]


def run(cmd: list[str]) -> None:
    """A `specserve` command of `cli`, run in this process (no interpreter start-up per stage)."""
    from specserve.cli import main

    log(" ".join(cmd[2:]))
    code = main(cmd[3:])
    if code:
        raise SystemExit(f"failed (exit {code}): specserve {' '.join(cmd[3:])}")


def export_drafter(src: Path, dst: Path) -> None:
    """A trained drafter into the bundle, float16 on disk like the target: it loads back to
    float32, and the draft step's products then stream half the bytes (their tiled copies are
    16-bit where that is exact). `src` may be `dst` (a float32 drafter converted in place)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    state = load_file(str(src / "model.safetensors"))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file(half, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text()) | {"torch_dtype": "float16"}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if src.resolve() != dst.resolve():
        shutil.copy(src / "train_log.json", dst / "train_log.json")


class Builder:
    """The stages of one build, in order; each is skipped when its result exists."""

    def __init__(self, recipe: Recipe, out: Path, work: Path, jobs: int, device: str) -> None:
        from specserve.train.bundle_eval import stage_estimates

        self.r, self.out, self.work, self.jobs, self.device = recipe, out, work, jobs, device
        self.corpus, self.tok = work / "corpus", work / "tokenizer"
        self.domains = [str(self.corpus / "code"), str(self.corpus / "prose")]
        self.estimates: dict[str, float] = {}
        rates = work / "step_times.json"
        if rates.is_file():
            step_times = json.loads(rates.read_text())
            self.estimates = stage_estimates(recipe, step_times, jobs)
            log(
                f"estimated {sum(self.estimates.values()) / 60:.0f} min for a build from scratch "
                f"(steps timed {step_times['measured']}; `--estimate` times them again)"
            )
        self.timings: dict[str, float] = {}
        self.results: dict = {}  # the evaluation's, for the README

    def stage(self, name: str, done: bool, fn) -> None:
        if done:
            return
        est = self.estimates.get(name)
        log(f"stage {name}" + (f" (estimate {est / 60:.1f} min)" if est is not None else ""))
        t0 = time.monotonic()
        fn()
        self.timings[name] = round(time.monotonic() - t0, 1)
        path = self.work / "stage_seconds.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps(old | self.timings, indent=2) + "\n")

    def build(self) -> None:
        w, out = self.work, self.out
        # A bundle whose target (or drafters) are already in `out` (a checkout of the repository,
        # whose work folder is gone) keeps them: the build then only makes what evaluating them
        # needs (the corpus, the held-out prompts and continuations) instead of training again.
        exported = (out / "target" / "model.safetensors").is_file()
        drafted = all(self.has(a) for a in ALGORITHMS)
        self.stage("corpus", (self.corpus / "prose").is_dir(), self.make_corpus)
        if exported and not (self.tok / "tokenizer.json").is_file():
            from specserve.train.target import copy_tokenizer

            self.tok.mkdir(parents=True, exist_ok=True)
            copy_tokenizer(out / "target", self.tok)  # the bundle's own, not a new one
        self.stage("tokenizer", (self.tok / "tokenizer.json").is_file(), self.make_tokenizer)
        if self.r.target_warmup:
            done = exported or (w / "target_short" / "model.safetensors").is_file()
            self.stage("target-short", done, lambda: self.train_target("target_short"))
        done = exported or (w / "target" / "model.safetensors").is_file()
        self.stage("target", done, self.train_target)
        self.stage("export", exported, self.export)
        self.stage("prompts", (w / "prompts.done").is_file(), self.make_prompts)
        self.stage("position-loss", (w / "position_loss.json").is_file(), self.position_loss)
        sets = self.data_sets(train=not drafted)
        done = all((w / name / "data.pt").is_file() for name, *_ in sets)
        # named apart when only the held-out sets are made, so that the recorded stage times
        # keep what the whole generation took
        self.stage("gen-data" if not drafted else "gen-data-heldout", done,
                   lambda: self.gen_data(sets))  # fmt: skip
        done = drafted or (w / "target_cache" / "index.json").is_file()
        self.stage("cache-target", done, self.cache)
        self.stage("drafters", drafted, self.train_drafters)
        self.stage("calibrate", (out / "dspark" / "sts.json").is_file(), self.calibrate)
        self.stage("evaluate", False, self.evaluate)
        self.write_readme()  # after the evaluation's own time is recorded
        size = _size_mb(out)
        if size > MAX_BUNDLE_MB:
            raise SystemExit(f"the bundle is {size:.1f} MB, over the {MAX_BUNDLE_MB} MB budget")
        log(f"done: {out} ({size:.1f} MB)")

    # -- stages ------------------------------------------------------------------------------
    def make_corpus(self) -> None:
        mb = str(self.r.corpus_mb)
        run(cli("train", "corpus", "--out", str(self.corpus), "--max-mb", mb)[:-2])  # no --threads

    def make_tokenizer(self) -> None:
        vocab = str(self.r.vocab_size)
        run(
            cli(
                "train",
                "tokenizer",
                "--corpus",
                *self.domains,
                "--vocab-size",
                vocab,
                "--out",
                str(self.tok),
            )
        )

    def train_target(self, name: str = "target") -> None:
        """One phase of the target's curriculum into `work/name`."""
        run_cfg = self.work / f"{name}.json"
        run_cfg.write_text(json.dumps(self.target_run(name), indent=2) + "\n")
        run(
            cli(
                *("train", "target", "--corpus", *self.domains, "--tokenizer", str(self.tok)),
                *("--config", str(run_cfg), "--out", str(self.work / name), "--resume"),
                *("--device", self.device),
            )
        )

    def target_run(self, name: str = "target") -> dict[str, Any]:
        short = name == "target_short"
        run_cfg = {
            "model": self.r.model,
            "train": self.r.target_warmup if short else self.r.target_train,
            "max_bytes_per_corpus": self.r.max_bytes_per_corpus,
        }
        if not short and self.r.target_warmup:
            run_cfg["init_from"] = str(self.work / "target_short")
        return run_cfg

    def export(self) -> None:
        """The trained target, float16 on disk (it loads back to float32)."""
        from specserve.models.loader import load_model
        from specserve.train.target import copy_tokenizer, save_hf

        src, dst = self.work / "target", self.out / "target"
        model, cfg = load_model(src)
        save_hf(model, {k: v for k, v in cfg.raw.items() if k != "torch_dtype"}, dst, "float16")
        copy_tokenizer(src, dst)
        log_ = json.loads((src / "train_log.json").read_text())
        configs = [self.target_run()]
        if self.r.target_warmup:  # the whole curriculum's tokens and time, phase by phase
            short = json.loads((self.work / "target_short" / "train_log.json").read_text())
            phases = [{k: x[k] for k in ("train", "train_tokens", "train_seconds", "heldout_loss")}
                      for x in (short, log_)]  # fmt: skip
            log_ |= {
                "phases": phases,
                "train_tokens": sum(p["train_tokens"] for p in phases),
                "train_seconds": round(sum(p["train_seconds"] for p in phases), 1),
            }
            configs.insert(0, self.target_run("target_short"))
        (dst / "train_log.json").write_text(json.dumps(log_, indent=2) + "\n")
        (dst / "train_config.json").write_text(json.dumps(configs, indent=2) + "\n")

    def make_prompts(self) -> None:
        w = self.work
        for n, length in zip(self.r.train_prompts, self.r.prompt_lens, strict=True):
            self.prompts("train", n, length, w / f"prompts_train_{length}.jsonl", whole=False)
        for n, length in zip(self.r.heldout_prompts, self.r.eval_lens, strict=True):
            whole = length != min(self.r.eval_lens)
            self.prompts("heldout", n, length, w / f"prompts_heldout_{length}.jsonl", whole)
        shutil.copy(w / f"prompts_heldout_{min(self.r.eval_lens)}.jsonl", self.out / SHORT_PROMPTS)
        shutil.copy(w / f"prompts_heldout_{self.r.long_len}.jsonl", self.out / LONG_PROMPTS)
        (w / "prompts.done").touch()

    def prompts(self, split: str, n: int, length: int, path: Path, whole: bool) -> None:
        run(
            cli(
                *("train", "prompts", "--corpus", *self.domains, "--tokenizer", str(self.tok)),
                *("--split", split, "--per-corpus", str(n), "--prompt-len", str(length)),
                *(["--whole-files"] if whole else []),
                *("--out", str(path)),
            )
        )

    def position_loss(self) -> None:
        from specserve.train.bundle_eval import heldout_position_loss

        loss = heldout_position_loss(
            self.out / "target", self.out / LONG_PROMPTS, self.r.position_edges, self.device
        )
        (self.work / "position_loss.json").write_text(json.dumps(loss, indent=2) + "\n")

    def data_sets(self, train: bool = True) -> list[tuple[str, Path, int, float]]:
        """(folder, prompts file, prompt length, temperature) of every gen-data run (the
        drafters' training sets with `train`, then the held-out ones)."""
        w, sets = self.work, []
        for length in self.r.prompt_lens if train else ():
            for temp, tag in ((1.0, "sampled"), (0.0, "greedy")):
                sets.append(
                    (
                        f"data_train_{length}_{tag}",
                        w / f"prompts_train_{length}.jsonl",
                        length,
                        temp,
                    )
                )
        for length in self.r.eval_lens:
            sets.append(
                (f"data_heldout_{length}", w / f"prompts_heldout_{length}.jsonl", length, 1.0)
            )
        return sets

    def train_data(self) -> list[str]:
        return [str(self.work / name) for name, *_ in self.data_sets() if "train" in name]

    def gen_data(self, sets: list[tuple[str, Path, int, float]]) -> None:
        for name, prompts, length, temp in sets:
            if not (self.work / name / "data.pt").is_file():
                run(
                    cli(
                        *("train", "gen-data", "--target", str(self.out / "target")),
                        *("--prompts", str(prompts), "--out", str(self.work / name)),
                        *("--prompt-len", str(length), "--max-new-tokens", str(self.r.new_tokens)),
                        *("--temperature", str(temp), "--device", self.device),
                        *("--batch-size", str(gen_batch(length))),
                    )
                )

    def cache(self) -> None:
        """The target's states of the training data, once for all three drafters (MTP reads
        only the last hidden state, which every cache holds)."""
        ids = [str(i) for i in self.r.target_layer_ids]
        run(
            cli(
                *("train", "cache-target", "--target", str(self.out / "target")),
                *("--data", *self.train_data(), "--out", str(self.work / "target_cache")),
                *("--target-layer-ids", *ids, "--batch-size", "4", "--device", self.device),
            )
        )

    def has(self, alg: str) -> bool:
        return (self.out / alg / "model.safetensors").is_file()

    def train_drafters(self) -> None:
        """Train the missing drafters, `jobs` at a time, each on one thread; copy them to `out`."""
        todo = [alg for alg in ALGORITHMS if not self.has(alg)]
        running: list[tuple[str, subprocess.Popen]] = []
        while todo or running:
            while todo and len(running) < self.jobs:
                alg = todo.pop(0)
                cmd = cli(
                    *("train", "drafter", "--algorithm", alg, "--target", str(self.out / "target")),
                    *("--data", *self.train_data(), "--out", str(self.work / alg)),
                    *("--target-cache", str(self.work / "target_cache")),
                    *("--steps", str(self.r.drafter_steps[alg])),
                    *(
                        "--batch-size",
                        str(self.r.drafter_batch),
                        "--resume",
                        "--device",
                        self.device,
                    ),
                    *self.r.drafter_flags(alg),
                )
                log(" ".join(cmd[2:]))
                logf = open(self.work / f"{alg}.log", "a")  # noqa: SIM115
                running.append((alg, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)))
            time.sleep(1)
            for alg, proc in list(running):
                if proc.poll() is None:
                    continue
                running.remove((alg, proc))
                if proc.returncode:
                    raise SystemExit(f"drafter {alg} failed; see {self.work / (alg + '.log')}")
                export_drafter(self.work / alg, self.out / alg)

    def calibrate(self) -> None:
        mid = sorted(self.r.eval_lens)[len(self.r.eval_lens) // 2]
        run(
            cli(
                *("train", "calibrate", "--drafter", str(self.out / "dspark")),
                *("--data", str(self.work / f"data_heldout_{mid}")),
                *("--target", str(self.out / "target"), "--device", self.device),
            )
        )

    def evaluate(self) -> None:
        from specserve.train.bundle_eval import evaluate_bundle

        heldout = {n: self.work / f"data_heldout_{n}" for n in self.r.eval_lens}
        self.results = evaluate_bundle(self.r, self.out, heldout, self.device)
        self.results["position_loss"] = json.loads((self.work / "position_loss.json").read_text())

    def write_readme(self) -> None:
        """The bundle's README from the evaluation and every stage's time, this run's included."""
        from specserve.train.bundle_readme import write_readme

        stages = json.loads((self.work / "stage_seconds.json").read_text())
        write_readme(self.r, self.out, self.results, stages)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/demo")
    ap.add_argument(
        "--work",
        help="intermediate files and checkpoints (default build/demo; --smoke: a temp dir)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="drafters trained at once")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="every stage at a tiny scale in a temporary folder (checks the pipeline)",
    )
    ap.add_argument(
        "--estimate",
        action="store_true",
        help="time a few full-size steps of every stage, write WORK/step_times.json, print the "
        "estimated time of each stage and exit",
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.estimate:
        from specserve.train.bundle_eval import print_estimate

        print_estimate(FULL, Path(args.work or "build/demo"), args.device)
        return 0
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="bundle-smoke-") as tmp:
            root = Path(args.work or tmp)
            out, work = root / "bundle", root / "work"
            out.mkdir(parents=True, exist_ok=True), work.mkdir(exist_ok=True)
            Builder(SMOKE, out, work, args.jobs, args.device).build()
            log(f"smoke build passed every stage ({_size_mb(out):.1f} MB)")
        return 0
    out, work = Path(args.out), Path(args.work or "build/demo")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    Builder(FULL, out, work, args.jobs, args.device).build()
    return 0


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


if __name__ == "__main__":
    sys.exit(main())
