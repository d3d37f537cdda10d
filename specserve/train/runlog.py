"""Per-step training logs a person can read: `train_log.jsonl` (one JSON object per optimizer
step) and TensorBoard event files under `tensorboard/` (written by the `tensorboard` package, no
TensorFlow); `plot_log` draws either as a PNG (`specserve train plot`).

A resumed run first drops the records of steps it is about to redo, so each file holds every
step exactly once. The TensorBoard folder is rewritten from the kept JSONL records into one fresh
event file: TensorBoard orders event files by name, and two writers opened in the same second by
one process are named by a counter compared as text (`...9` sorts after `...10`), so a purge
event in a second file could be read before the records it purges.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

JSONL_NAME = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"


class RunLog:
    """Writes one record per step: `{"step": s, name: value, ...}`. Only rank 0 opens one."""

    def __init__(self, out: str | Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / JSONL_NAME
        kept = [r for r in read_jsonl(self.path) if r["step"] < start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.jsonl = self.path.open("a")
        tb_dir = out / TENSORBOARD_DIR
        for old in tb_dir.glob("events.out.tfevents.*"):
            old.unlink()
        self.tb = SummaryWriter(str(tb_dir))
        for record in kept:
            self._add_scalars(record)

    def _add_scalars(self, record: dict[str, Any]) -> None:
        for name, value in record.items():
            if name != "step":
                self.tb.add_scalar(f"train/{name}", value, record["step"])

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self._add_scalars(record)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_tensorboard(path: str | Path) -> list[dict[str, Any]]:
    """Scalars of a TensorBoard log folder as step records (tags without the `train/` prefix)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    steps: dict[int, dict[str, Any]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            rec = steps.setdefault(event.step, {"step": event.step})
            rec[tag.removeprefix("train/")] = event.value
    return [steps[s] for s in sorted(steps)]


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Records from a JSONL file, a TensorBoard folder, or a run folder holding either."""
    path = Path(path)
    if path.is_dir() and (path / JSONL_NAME).is_file():
        return read_jsonl(path / JSONL_NAME)
    if path.is_dir() and (path / TENSORBOARD_DIR).is_dir():
        path = path / TENSORBOARD_DIR
    if path.is_dir():
        records = read_tensorboard(path)
    elif path.is_file():
        records = read_jsonl(path)
    else:
        raise FileNotFoundError(f"{path}: no such log file or folder")
    if not records:
        raise ValueError(f"{path}: no training records in it")
    return records


def plot_log(path: str | Path, out_png: str | Path, metrics: list[str] | None = None) -> list[str]:
    """One panel per metric (default: every metric but lr) against the step; -> metrics drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(path)
    present = sorted({k for r in records for k in r} - {"step"})
    metrics = metrics or [m for m in present if m != "lr"]
    missing = sorted(set(metrics) - set(present))
    if missing:
        raise ValueError(f"{path}: no metric {missing[0]!r} (it has {', '.join(present)})")
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 2.2 * len(metrics)), squeeze=False)
    for ax, name in zip(axes[:, 0], metrics, strict=True):
        points = [(r["step"], r[name]) for r in records if name in r]
        ax.plot(*zip(*points, strict=True), lw=1.2)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return metrics
