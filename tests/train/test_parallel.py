"""Data-parallel training: 2 gloo processes under torchrun take the same steps as 1 process at
the same global batch, a run resumes with another number of processes, accumulation is exact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from specserve.cli import main
from specserve.models.loader import load_model
from specserve.speculative.checkpoint import load_drafter
from specserve.speculative.handle import TargetHandle
from specserve.train.loop import TrainConfig, fit, trainable
from specserve.train.parallel import World
from specserve.train.runlog import read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path, tiny_target, tiny_data) -> Path:
    """A DSpark run with a constant learning rate, so a 2-step run resumed to 4 steps follows
    the same schedule as a 4-step run; global batch 4 in micro-batches of 2."""
    recipe = {
        "algorithm": "dspark",
        "target": tiny_target,
        "data": [tiny_data],
        "block-size": 4,
        "anchors-per-seq": 4,
        "target-layer-ids": [0, 2],
        "markov-rank": 16,
        "global-batch-size": 4,
        "local-batch-size": 2,
        "lr": 3e-3,
        "min-lr": 3e-3,
        "warmup-ratio": 0.0,
        "precision": "fp32",
        "checkpoint-minutes": 0.0,
        "threads": 1,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _torchrun(nproc: int, argv: list[str]) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "specserve.cli", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_gloo_processes_match_one_and_resume_with_one(tiny_target, tiny_data, tmp_path):
    recipe = _recipe(tmp_path, tiny_target, tiny_data)
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["train", "drafter", "--config", str(recipe)]
    assert main([*args, "--out", str(one), "--steps", "4"]) == 0
    _torchrun(2, [*args, "--out", str(two), "--steps", "2"])
    ref = read_jsonl(one / "train_log.jsonl")
    par = read_jsonl(two / "train_log.jsonl")
    assert [r["step"] for r in ref] == [0, 1, 2, 3] and [r["step"] for r in par] == [0, 1]
    assert torch.load(two / "checkpoint.pt", weights_only=False)["step"] == 2

    assert main([*args, "--out", str(two), "--steps", "4", "--resume"]) == 0
    resumed = read_jsonl(two / "train_log.jsonl")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(ref, resumed, strict=True):
        for name in ("total", "ce", "tv", "bce"):
            assert abs(a[name] - b[name]) < 1e-5, (a["step"], name, a[name], b[name])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)  # sums in another order
    assert ref[3]["total"] != ref[0]["total"]  # the steps did change the drafter
    target, _ = load_model(tiny_target)
    wa = trainable(load_drafter(one, TargetHandle.of(target)))
    wb = trainable(load_drafter(two, TargetHandle.of(target)))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


class _Line(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Linear(3, 1)


def _fit_line(tmp_path: Path, local: int, precision: str = "fp32") -> list[dict]:
    """A least-squares fit through `fit`; the loss of a micro-batch is its mean."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, generator=gen), torch.randn(32, generator=gen)
    model = _Line()

    def loss_fn(idx, _gen):
        loss = ((model.w(x[idx]).squeeze(-1) - y[idx]) ** 2).mean()
        return loss, {"loss": loss}

    cfg = TrainConfig(
        steps=3, batch_size=8, local_batch_size=local, lr=0.1, warmup=1, precision=precision
    )
    out = tmp_path / f"line-{local}-{precision}"
    fit(model, loss_fn, lambda s: torch.arange(8 * s, 8 * s + 8), cfg, out)
    return read_jsonl(out / "train_log.jsonl")


def test_accumulated_micro_batches_equal_one_batch(tmp_path):
    whole, parts = _fit_line(tmp_path, 8), _fit_line(tmp_path, 2)
    for a, b in zip(whole, parts, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-6


def test_bf16_autocast_runs_the_loss_in_bf16(tmp_path, monkeypatch):
    seen = []
    real = torch.nn.functional.linear

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    bf16 = _fit_line(tmp_path, 4, "bf16")
    monkeypatch.setattr(torch.nn.functional, "linear", real)
    fp32 = _fit_line(tmp_path, 4, "fp32")
    assert torch.bfloat16 in seen
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.05)


def test_global_batch_must_split_over_processes_and_micro_batches():
    cfg = TrainConfig(batch_size=12, local_batch_size=4)
    assert cfg.micro_batches(1) == (4, 3) and cfg.micro_batches(3) == (4, 1)
    with pytest.raises(ValueError, match="not a multiple of 2 process"):
        cfg.micro_batches(2)
    assert TrainConfig(batch_size=12).micro_batches(4) == (3, 1)


def test_world_slices_cover_every_item_once():
    n = 11
    parts = [World(r, 3).slice(n) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3]
    assert [i for p in parts for i in p] == list(range(n))
    with pytest.raises(ValueError, match="outside"):
        World(2, 2)
