"""What every training run shares: the schedule, checkpoints that `--resume` continues from,
and the progress bar (loss and tokens/s)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule of one run: AdamW, linear warm-up, cosine decay to `min_lr`."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_minutes: float = 3.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train config: {name} must be positive")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train config: unknown fields {unknown}")
        return cls(**d)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1, frac)))


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


class Checkpointer:
    """`out/checkpoint.pt` holds the trainable weights, optimizer, step and log; it is written
    atomically every `minutes` and at the end, and `load()` resumes from it."""

    def __init__(self, out: str | Path, minutes: float) -> None:
        self.path = Path(out) / "checkpoint.pt"
        self.interval = minutes * 60
        self.last = time.monotonic()

    def exists(self) -> bool:
        return self.path.is_file()

    def maybe_save(self, state: dict[str, Any], force: bool = False) -> bool:
        if not force and time.monotonic() - self.last < self.interval:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self.last = time.monotonic()
        return True

    def load(self) -> dict[str, Any]:
        return torch.load(self.path, map_location="cpu", weights_only=False)


class Progress:
    """A tqdm bar showing loss and training tokens per second."""

    def __init__(self, total: int, start: int, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc=desc, mininterval=5.0, smoothing=0.1)
        self.t0 = time.monotonic()
        self.tokens = 0

    def update(self, tokens: int, **metrics: float) -> None:
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.monotonic() - self.t0)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()} | {"tok/s": f"{rate:.0f}"})
        self.bar.update(1)

    def tokens_per_second(self) -> float:
        return self.tokens / max(1e-9, time.monotonic() - self.t0)

    def close(self) -> None:
        self.bar.close()


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")
