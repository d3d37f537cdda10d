"""Data parallelism for training runs started by `torchrun`: the process's place in the job
(`World`), joining the process group (gloo on CPU, NCCL on GPU), and the collectives a training
step needs: gradients averaged over ranks (what DDP does, done once per optimizer step so the
drafter losses may call submodules outside `forward`), metrics averaged, a barrier.

A run without torchrun is a world of one, and every collective is then a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

BUCKET_NUMEL = 1 << 24  # gradients are all-reduced in flat buckets of at most this many floats


@dataclass(frozen=True)
class World:
    """This process's rank among `size` training processes (`local_rank` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.size}")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> World:
        """The world torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (none: one process)."""
        return cls(
            int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
        )

    def slice(self, n: int) -> range:
        """This rank's contiguous share of n items (the first n % size ranks get one more)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))


def init_world(device: str, timeout_minutes: float = 30.0) -> tuple[World, str]:
    """Join torchrun's process group when there is one; -> (world, this rank's device)."""
    world = World.from_env()
    if world.size == 1:
        return world, device
    if device.startswith("cuda"):
        torch.cuda.set_device(world.local_rank)
        device = f"cuda:{world.local_rank}"
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return world, device


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_parameters(params: Iterable[torch.nn.Parameter], world: World) -> None:
    """Every rank starts from rank 0's weights (as DDP does when it wraps a model)."""
    if world.size == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def average_gradients(params: Iterable[torch.nn.Parameter], world: World) -> None:
    """Replace every gradient by its mean over ranks (a missing gradient counts as zero)."""
    if world.size == 1:
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(params):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        flat /= world.size
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def average_metrics(metrics: dict[str, float], world: World, device: str) -> dict[str, float]:
    """Means over ranks of per-rank scalar metrics (the same keys on every rank)."""
    if world.size == 1:
        return metrics
    t = torch.tensor(list(metrics.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(metrics, (t / world.size).tolist(), strict=True))


def _buckets(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    buckets, size = [[]], 0
    for p in params:
        if size and size + p.numel() > BUCKET_NUMEL:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    return buckets
