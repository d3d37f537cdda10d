"""The server's control loop: worker liveness, replica sync, and instance placement.

Placement is a pure function over `WorkerView`s: filters (ready, selector labels,
framework, model path present) -> resource fit (RAM/VRAM estimated from checkpoint
size on disk) -> choice (spread: fewest replicas of this model; binpack: least room
left) -> a free port from the worker's range.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
from dataclasses import dataclass

import httpx
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from specserve.cluster.db import InferenceBackend, Model, ModelInstance, Worker, utcnow
from specserve.cluster.schemas import LaunchTemplate, WorkerStatus

log = logging.getLogger("specserve.cluster.scheduler")
GiB = 1024**3
MiB = 1024**2
ACTIVE_STATES = ("scheduled", "starting", "running", "error")


@dataclass(frozen=True)
class WorkerView:
    """What placement needs to know about one worker (resources net of existing claims)."""

    id: int
    name: str
    ip: str
    ready: bool
    labels: dict[str, str]
    ram_free: int
    gpus_free: tuple[tuple[int, int], ...]  # (gpu index, allocatable bytes)
    replicas_of_model: int
    ports_used: frozenset[int]
    port_range: tuple[int, int]
    checkpoint_size: int | None  # bytes on this worker; None = path not found there


@dataclass(frozen=True)
class Demand:
    framework: str
    ram: int
    vram: int
    selector: dict[str, str]
    placement: str


@dataclass(frozen=True)
class Placement:
    worker_id: int
    port: int
    gpu_ids: tuple[int, ...]
    ram: int
    vram: int


def estimate(size_bytes: int, framework: str) -> tuple[int, int]:
    """(RAM, VRAM) claim for a checkpoint: weights plus 20% for activations and KV cache."""
    weights = int(size_bytes * 1.2)
    if framework == "cuda":
        return 512 * MiB, weights
    return weights + 256 * MiB, 0


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def fit(w: WorkerView, framework: str, selector: dict[str, str]) -> Placement | str:
    """Place one instance on `w`, or say why it does not fit there."""
    if not w.ready:
        return "not ready"
    missing = {k: v for k, v in selector.items() if w.labels.get(k) != v}
    if missing:
        return f"labels do not match {missing}"
    if framework == "cuda" and not w.gpus_free:
        return "no GPU (backend framework is cuda)"
    if w.checkpoint_size is None:
        return "model path not found on this worker"
    ram, vram = estimate(w.checkpoint_size, framework)
    if ram > w.ram_free:
        return f"needs {_fmt(ram)} RAM, {_fmt(max(w.ram_free, 0))} allocatable"
    gpu_ids: tuple[int, ...] = ()
    if framework == "cuda":
        gpus = sorted(w.gpus_free, key=lambda g: -g[1])
        total = 0
        for index, free in gpus:
            gpu_ids += (index,)
            total += free
            if total >= vram:
                break
        if total < vram:
            return f"needs {_fmt(vram)} VRAM, {_fmt(total)} allocatable on {len(gpus)} GPU(s)"
    port = next(
        (p for p in range(w.port_range[0], w.port_range[1] + 1) if p not in w.ports_used), None
    )
    if port is None:
        return f"no free port in {w.port_range[0]}-{w.port_range[1]}"
    return Placement(w.id, port, gpu_ids, ram, vram)


def place(
    workers: list[WorkerView], framework: str, selector: dict[str, str], strategy: str
) -> Placement | str:
    """The chosen placement, or a message listing why each worker was rejected."""
    fits: list[tuple[WorkerView, Placement]] = []
    reasons = []
    for w in workers:
        p = fit(w, framework, selector)
        if isinstance(p, Placement):
            fits.append((w, p))
        else:
            reasons.append(f"{w.name}: {p}")
    if not fits:
        return "no worker fits: " + ("; ".join(reasons) if reasons else "no workers registered")

    def room(item: tuple[WorkerView, Placement]) -> int:
        w, p = item
        return w.ram_free - p.ram + sum(f for _, f in w.gpus_free) - p.vram

    if strategy == "binpack":
        return min(fits, key=lambda it: (room(it), it[0].id))[1]
    return min(fits, key=lambda it: (it[0].replicas_of_model, -room(it), it[0].id))[1]


# ----------------------------------------------------------------------------- control loop


class Controller:
    """Background loop of the server. Each tick: liveness, replicas, placement."""

    def __init__(
        self,
        sessions: sessionmaker,
        token: str,
        heartbeat_timeout: float,
        interval: float,
        http: httpx.AsyncClient,
    ) -> None:
        self.sessions = sessions
        self.token = token
        self.heartbeat_timeout = heartbeat_timeout
        self.interval = interval
        self.http = http
        self.wake = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bad row must not stop the loop
                log.exception("controller tick failed")
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval)
            except TimeoutError:
                pass
            self.wake.clear()

    async def tick(self) -> None:
        await asyncio.to_thread(self.check_workers)
        await asyncio.to_thread(self.sync_replicas)
        await self.schedule_pending()

    def check_workers(self) -> None:
        """Mark silent workers not ready and send their instances back to pending."""
        deadline = utcnow() - dt.timedelta(seconds=self.heartbeat_timeout)
        with self.sessions.begin() as s:
            stale = s.scalars(
                sa.select(Worker).where(Worker.state == "ready", Worker.heartbeat_at < deadline)
            ).all()
            for w in stale:
                w.state = "not_ready"
                w.state_message = f"no heartbeat for {self.heartbeat_timeout:g}s"
                log.warning("worker %s missed heartbeats", w.name)
                for inst in s.scalars(
                    sa.select(ModelInstance).where(ModelInstance.worker_id == w.id)
                ):
                    reset_instance(inst, f"worker {w.name} stopped responding; rescheduling")

    def sync_replicas(self) -> None:
        """Create or delete instances so each deployment has `replicas` of them."""
        with self.sessions.begin() as s:
            for m in s.scalars(sa.select(Model)).all():
                insts = s.scalars(
                    sa.select(ModelInstance).where(ModelInstance.model_id == m.id)
                ).all()
                for _ in range(m.replicas - len(insts)):
                    s.add(new_instance(m))
                order = {"pending": 0, "error": 1, "scheduled": 2, "starting": 3, "running": 4}
                surplus = sorted(insts, key=lambda i: (order.get(i.state, 0), -i.id))
                for inst in surplus[: max(len(insts) - m.replicas, 0)]:
                    s.delete(inst)

    async def schedule_pending(self) -> None:
        with self.sessions() as s:
            pending = s.scalars(
                sa.select(ModelInstance)
                .where(ModelInstance.state == "pending")
                .order_by(ModelInstance.id)
            ).all()
        for inst in pending:
            await self.schedule_one(inst.id)

    async def schedule_one(self, instance_id: int) -> None:
        with self.sessions() as s:
            inst = s.get(ModelInstance, instance_id)
            model = s.get(Model, inst.model_id) if inst else None
            if inst is None or model is None or inst.state != "pending":
                return
            launch = launch_template(s, model)
            workers = s.scalars(sa.select(Worker).order_by(Worker.id)).all()
        if isinstance(launch, str):
            result: Placement | str = launch
        else:
            views = [await self.view(w, model) for w in workers]
            result = place(views, launch.framework, model.worker_selector, model.placement)
        with self.sessions.begin() as s:
            inst = s.get(ModelInstance, instance_id)
            if inst is None or inst.state != "pending":
                return
            if isinstance(result, str):
                inst.state_message = result
                return
            w = s.get(Worker, result.worker_id)
            inst.state, inst.state_message = "scheduled", ""
            inst.worker_id, inst.worker_name, inst.worker_ip = w.id, w.name, w.ip
            inst.port, inst.gpu_ids = result.port, list(result.gpu_ids)
            inst.computed_resource = {"ram": result.ram, "vram": result.vram}
            log.info("scheduled %s on %s:%s", inst.name, w.name, result.port)

    async def view(self, w: Worker, model: Model) -> WorkerView:
        with self.sessions() as s:
            claims = s.scalars(
                sa.select(ModelInstance).where(
                    ModelInstance.worker_id == w.id, ModelInstance.state.in_(ACTIVE_STATES)
                )
            ).all()
            same_ip = s.scalars(
                sa.select(ModelInstance.port).where(
                    ModelInstance.worker_ip == w.ip, ModelInstance.port.is_not(None)
                )
            ).all()
        status = WorkerStatus.model_validate(w.status or {})
        gpus = []
        for g in status.gpus:
            used = sum(
                c.computed_resource.get("vram", 0) // max(len(c.gpu_ids), 1)
                for c in claims
                if g.index in c.gpu_ids
            )
            gpus.append((g.index, g.memory_total - used))
        size = 0 if model.source != "local_path" else await self.checkpoint_size(w, model)
        return WorkerView(
            id=w.id,
            name=w.name,
            ip=w.ip,
            ready=w.state == "ready",
            labels=w.labels or {},
            ram_free=status.memory_total - sum(c.computed_resource.get("ram", 0) for c in claims),
            gpus_free=tuple(gpus),
            replicas_of_model=sum(1 for c in claims if c.model_id == model.id),
            ports_used=frozenset(same_ip),
            port_range=(w.port_range_start, w.port_range_end),
            checkpoint_size=size,
        )

    async def checkpoint_size(self, w: Worker, model: Model) -> int | None:
        """Bytes of the model path on that worker (asked over the worker's API)."""
        if w.state != "ready":
            return None
        try:
            r = await self.http.get(
                f"http://{w.ip}:{w.port}/v1/paths/stat",
                params={"path": model.local_path},
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=5.0,
            )
            r.raise_for_status()
            info = r.json()
        except (httpx.HTTPError, ValueError) as e:
            log.warning("path check on worker %s failed: %s", w.name, e)
            return None
        return int(info["size"]) if info.get("exists") else None


def launch_template(s: Session, model: Model) -> LaunchTemplate | str:
    """How to launch a deployment (its backend version with the backend's defaults applied),
    or a message saying what is missing."""
    backend = s.scalar(sa.select(InferenceBackend).where(InferenceBackend.name == model.backend))
    if backend is None:
        return f"inference backend {model.backend!r} does not exist"
    name = model.backend_version or backend.default_version
    if name not in backend.versions:
        return f"backend {backend.name!r} has no version {name!r}"
    v = backend.versions[name]
    return LaunchTemplate(
        entrypoint=v.get("entrypoint") or backend.default_entrypoint,
        run_command=v.get("run_command") or backend.default_run_command,
        image_name=v.get("image_name"),
        framework=v.get("custom_framework") or "cpu",
        env={**backend.default_env, **(v.get("env") or {})},
        default_parameters=backend.default_backend_param,
        health_check_path=backend.health_check_path,
    )


def new_instance(m: Model) -> ModelInstance:
    return ModelInstance(
        name=f"{m.name}-{secrets.token_hex(3)}",
        model_id=m.id,
        model_name=m.name,
        gpu_ids=[],
        computed_resource={},
        state="pending",
        state_message="",
        restart_count=0,
    )


def reset_instance(inst: ModelInstance, message: str) -> None:
    """Send an instance back to the scheduler."""
    inst.state, inst.state_message = "pending", message
    inst.worker_id = inst.worker_name = inst.worker_ip = inst.port = inst.pid = None
    inst.gpu_ids, inst.computed_resource = [], {}
