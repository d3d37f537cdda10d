"""What every training run shares: the schedule, the data-parallel step loop (`fit`: global batch
by gradient accumulation over ranks, bf16 autocast, clipping), checkpoints that `--resume`
continues from (with any number of processes), the per-step logs and the progress bar."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from specserve.train.parallel import (
    World,
    average_gradients,
    average_metrics,
    broadcast_parameters,
)
from specserve.train.runlog import RunLog

PRECISIONS = ("fp32", "bf16")
# (rows of one micro-batch, its generator) -> (objective to minimise, scalar metrics to log)
LossFn = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule of one run: AdamW, linear warm-up, cosine decay to `min_lr`.

    `batch_size` is the global batch of one optimizer step; each rank runs micro-batches of
    `local_batch_size` rows (0: the global batch split evenly over the ranks) and accumulates
    their gradients. `grad_clip` bounds the global L2 norm of the averaged gradient (DeepSpec:
    1.0, applied once per optimizer step after the ranks are synchronised)."""

    steps: int = 1000
    batch_size: int = 16
    local_batch_size: int = 0
    precision: str = "fp32"
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
        if self.local_batch_size < 0:
            raise ValueError("train config: local_batch_size must be positive (0: automatic)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train config: precision must be one of {', '.join(PRECISIONS)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train config: unknown fields {unknown}")
        return cls(**d)

    def micro_batches(self, world_size: int) -> tuple[int, int]:
        """-> (rows per micro-batch, micro-batches per rank and step)."""
        local = self.local_batch_size or self.batch_size // world_size
        if local == 0 or self.batch_size % (local * world_size):
            raise ValueError(
                f"global batch size {self.batch_size} is not a multiple of {world_size} "
                f"process(es) x local batch size {local or self.local_batch_size}"
            )
        return local, self.batch_size // (local * world_size)

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


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a run trains and checkpoints (a drafter's shared target modules excluded)."""
    shared = tuple(f"{name}." for name in getattr(model, "SHARED", ()))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(shared)}


def fit(
    model: torch.nn.Module,
    loss_fn: LossFn,
    rows_of_step: Callable[[int], torch.Tensor],
    cfg: TrainConfig,
    out: str | Path,
    world: World = World(),
    resume: bool = False,
    device: str = "cpu",
    desc: str = "train",
    tokens_per_row: int = 1,
) -> tuple[list[dict[str, float]], float]:
    """Run `cfg.steps` optimizer steps of data-parallel training; -> (every 10th step's metrics,
    seconds spent). Step s reads the global rows `rows_of_step(s)`, cut into micro-batches;
    micro-batch m (counted over all ranks) lives on rank m // per_rank and samples from its own
    generator, so one process and several at the same global batch take the same steps.
    Rank 0 logs and checkpoints; `resume` continues from the checkpoint with any world size."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    ckpt = Checkpointer(out, cfg.checkpoint_minutes)
    start, log, elapsed = 0, [], 0.0
    if resume and ckpt.exists():
        state = ckpt.load()
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        start, log, elapsed = state["step"], state["log"], state["elapsed"]
    cfg.micro_batches(world.size)  # a batch that does not split fails before the first step
    broadcast_parameters(params, world)
    runlog = RunLog(out, start) if world.main else None
    bar = Progress(cfg.steps, start, desc) if world.main else None
    t0 = time.monotonic()
    for step in range(start, cfg.steps):
        rows = rows_of_step(step)
        lr = cfg.lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        metrics = _accumulate(loss_fn, rows, step, cfg, world, device)
        average_gradients(params, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics = average_metrics(metrics, world, device)
        if step % 10 == 0 or step + 1 == cfg.steps:
            log.append({"step": step, **{k: round(v, 4) for k, v in metrics.items()}})
        if not world.main:
            continue
        runlog.write({"step": step, **metrics, "lr": lr, "grad_norm": grad_norm})
        bar.update(len(rows) * tokens_per_row, **metrics)
        state = {
            "model": trainable(model),
            "optimizer": opt.state_dict(),
            "step": step + 1,
            "log": log,
            "elapsed": elapsed + time.monotonic() - t0,
        }
        ckpt.maybe_save(state, force=step + 1 == cfg.steps)
    if world.main:
        bar.close()
        runlog.close()
    return log, elapsed + time.monotonic() - t0


def _accumulate(
    loss_fn: LossFn, rows: torch.Tensor, step: int, cfg: TrainConfig, world: World, device: str
) -> dict[str, float]:
    """Backward of this rank's micro-batches of one step (each scaled by 1 / their number);
    -> their mean metrics."""
    local, accum = cfg.micro_batches(world.size)
    metrics: dict[str, float] = {}
    for m in range(world.rank * accum, (world.rank + 1) * accum):
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 65_536 + m)
        with torch.autocast(torch.device(device).type, torch.bfloat16, cfg.precision == "bf16"):
            objective, parts = loss_fn(rows[m * local : (m + 1) * local], gen)
        (objective / accum).backward()
        for name, value in parts.items():
            metrics[name] = metrics.get(name, 0.0) + value.item() / accum
    return metrics


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
