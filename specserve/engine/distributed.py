"""Serving one model over several ranks: start them, join the process group, run the steps.

`specserve serve --tp-size/--ep-size` starts one process per rank of its node (spawned); the
first process of node 0 is rank 0. Rank 0 runs the scheduler, the drafter, verification and the
HTTP server; before each target forward it broadcasts the step's batch (`BatchSeq`s: token ids,
positions, block tables) to the other ranks, which run the same forward on their shard and
nothing else. Every decision (scheduling, sampling, accept / reject) is made on rank 0 and
reaches the workers as the next batch, so all ranks always verify the same tokens; a worker's
KV slots for rejected tokens are simply overwritten later, as on rank 0.

Two groups: the default group (gloo on CPU, NCCL on GPU) carries the model's collectives under
`--dist-timeout`; a gloo control group with no practical timeout carries the step broadcasts,
because an idle server's workers may wait for the next step for hours.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from specserve.config import DTYPES, CacheConfig
from specserve.engine.model_runner import BatchSeq, ForwardResult, ModelRunner, num_kv_blocks
from specserve.engine.state_runner import StateRunner
from specserve.models.loader import load_model
from specserve.models.parallel import Parallel, ParallelConfig
from specserve.models.qwen3 import CausalLM
from specserve.ports import free_port

log = logging.getLogger("specserve.distributed")

_IDLE_TIMEOUT = timedelta(days=365)  # the control group: workers wait this long for a step


class DistributedError(RuntimeError):
    """Ranks could not form or keep their group; the message says what to check."""


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs to build its shard and KV cache (sent to spawned ranks)."""

    model_path: str
    parallel: ParallelConfig
    dtype: str = "float32"
    device: str = "cpu"
    cache: CacheConfig = CacheConfig()
    moe_backend: str | None = None
    num_threads: int | None = None  # torch threads per rank (None: cores / ranks on the node)

    def device_of(self, rank: int) -> str:
        if self.device.startswith("cuda"):
            return f"cuda:{rank % self.parallel.ranks_per_node}"
        return self.device


class RankGroup:
    """This process's membership in the group: collectives for setup, steps, shutdown."""

    def __init__(self, spec: RankSpec, rank: int, procs: list) -> None:
        self.spec, self.rank, self.procs = spec, rank, procs
        self.parallel = Parallel.create(spec.parallel, rank)
        self.control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
        self._closed = False

    def agree_num_blocks(self, n: int) -> int:
        """The KV block count every rank can hold (the minimum of the ranks' own counts)."""
        t = torch.tensor([n], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def make_runner(
        self,
        model: CausalLM,
        num_blocks: int,
        page_size: int,
        dtype: torch.dtype,
        device: str,
        capture: tuple[int, ...] = (),
        attention_backend: str = "torch",
        kv_dtype: torch.dtype | None = None,
    ) -> ModelRunner | StateRunner:
        """Rank 0's runner: broadcasts each batch before running it."""
        cls = BroadcastingStateRunner if hasattr(model, "new_state") else BroadcastingRunner
        return cls(
            self, model, num_blocks, page_size, dtype, device, capture, attention_backend, kv_dtype
        )

    def send_step(self, seqs: list[BatchSeq] | None) -> None:
        dist.broadcast_object_list([seqs], src=0, group=self.control)

    def recv_step(self) -> list[BatchSeq] | None:
        box: list = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def close(self) -> None:
        """Rank 0: tell the workers to stop, leave the group, wait for local ranks to exit."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.rank == 0:
                self.send_step(None)
            dist.destroy_process_group()
        finally:
            for p in self.procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.terminate()

    def abort(self) -> None:
        """Leave the group after a failed start; local ranks are stopped, not asked."""
        self._closed = True
        dist.destroy_process_group()
        for p in self.procs:
            p.terminate()
            p.join(timeout=10)


class _Broadcasting:
    def __init__(self, group: RankGroup, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def forward(self, seqs: list[BatchSeq]) -> ForwardResult:
        self.group.send_step(seqs)
        return super().forward(seqs)  # type: ignore[misc]  # the runner class mixed in after


class BroadcastingRunner(_Broadcasting, ModelRunner):
    pass


class BroadcastingStateRunner(_Broadcasting, StateRunner):
    """The same for a model with per-request state: every rank keeps the same states."""


def free_local_addr() -> str:
    return f"127.0.0.1:{free_port()}"


def start_ranks(spec: RankSpec) -> RankGroup:
    """Spawn this node's other ranks and join the group as the node's first rank.

    On node 0 the caller is rank 0 and gets the group to build its engine with; on other nodes
    the caller should then `serve_steps` as a worker."""
    par = spec.parallel
    if par.dist_init_addr is None:
        spec = replace(spec, parallel=replace(par, dist_init_addr=free_local_addr()))
    if spec.num_threads is None and not spec.device.startswith("cuda"):
        spec = replace(spec, num_threads=max(1, (os.cpu_count() or 1) // par.ranks_per_node))
    first = par.node_rank * par.ranks_per_node
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=worker_main, args=(spec, first + i), daemon=True, name=f"rank{first + i}"
        )
        for i in range(1, par.ranks_per_node)
    ]
    for p in procs:
        p.start()
    try:
        return join(spec, first, procs)
    except BaseException:
        for p in procs:
            p.terminate()
        raise


def join(spec: RankSpec, rank: int, procs: list | None = None) -> RankGroup:
    """init_process_group for `rank`, bounded by --dist-timeout, with a message that says why."""
    par = spec.parallel
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    device = spec.device_of(rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            "nccl" if device.startswith("cuda") else "gloo",
            init_method=f"tcp://{par.dist_init_addr}",
            rank=rank,
            world_size=par.world_size,
            timeout=timedelta(seconds=par.timeout_s),
        )
        return RankGroup(spec, rank, procs or [])
    except Exception as e:  # the store and gloo raise several error types
        _forget_failed_init()
        raise DistributedError(
            f"rank {rank} of {par.world_size}: the ranks did not all meet at "
            f"{par.dist_init_addr} within {par.timeout_s:g} s (--dist-timeout). Check that "
            f"every node was started with the same --nnodes ({par.nnodes}) and --dist-init-addr, "
            f"and that this address is reachable. ({type(e).__name__}: {e})"
        ) from None


def _forget_failed_init() -> None:
    """Leave this process able to join a group again. A failed init_process_group has already
    used a group name from torch's per-process counter (names must match across ranks), and
    only destroy_process_group, which needs a group, resets it."""
    if dist.is_initialized():
        dist.destroy_process_group()
    else:
        dist.distributed_c10d._world.group_count = 0


def worker_main(spec: RankSpec, rank: int) -> None:
    """Entry point of a spawned rank (and of a non-zero node's first process)."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s: %(message)s"
    )
    try:
        group = join(spec, rank)
        serve_steps(group)
    except Exception as e:
        log.error("rank %d stopped: %s", rank, e)
        raise SystemExit(1) from None


def serve_steps(group: RankGroup) -> None:
    """A worker's life: build the same shard and cache as rank 0, then run its batches."""
    spec, rank = group.spec, group.rank
    dtype, device = DTYPES[spec.dtype], spec.device_of(rank)
    model, cfg = load_model(spec.model_path, dtype, device, group.parallel, spec.moe_backend)
    model.fuse()
    kv_dtype = spec.cache.kv_dtype(dtype)
    blocks = group.agree_num_blocks(num_kv_blocks(cfg, spec.cache, kv_dtype))
    runner_cls = StateRunner if hasattr(model, "new_state") else ModelRunner
    runner = runner_cls(model, blocks, spec.cache.page_size, dtype, device, kv_dtype=kv_dtype)
    log.info("rank %d ready (%d KV blocks)", rank, blocks)
    try:
        while (seqs := group.recv_step()) is not None:
            runner.forward(seqs)
    finally:
        group.close()
