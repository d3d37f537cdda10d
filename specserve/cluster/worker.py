"""The worker: registers, heartbeats its status, and runs the instances assigned to it.

Each tick it sends a heartbeat (CPU, RAM, GPUs), receives its assignments, starts what
is new, stops what is gone, health-checks what runs and restarts what crashed with
exponential backoff (base·2ⁿ, capped). It also serves a small API to the server:
model path checks (for placement) and instance logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from specserve.cluster.runtime import LaunchError, ProcessRuntime, Runtime, build_launch_spec
from specserve.cluster.schemas import Assignment, GPUInfo, WorkerStatus

log = logging.getLogger("specserve.cluster.worker")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass(frozen=True)
class WorkerConfig:
    server_url: str
    token: str
    data_dir: Path
    name: str = field(default_factory=socket.gethostname)
    ip: str | None = None  # default: the address that routes to the server
    host: str | None = None  # where the worker API listens; default: `ip` only
    port: int = 10150  # the worker's own API (logs, path checks)
    port_range: tuple[int, int] = (40000, 40063)
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_interval: float = 5.0
    restart_backoff: float = 10.0
    restart_backoff_max: float = 300.0
    health_failures: int = 3  # failed checks of a running instance before it is restarted

    def __post_init__(self) -> None:
        lo, hi = self.port_range
        if not 0 < lo <= hi < 65536:
            raise ValueError(f"bad service port range {lo}-{hi}")
        if self.heartbeat_interval <= 0 or self.restart_backoff <= 0:
            raise ValueError("heartbeat_interval and restart_backoff must be positive")
        if not self.server_url.startswith(("http://", "https://")):
            raise ValueError(f"server URL must start with http:// or https://: {self.server_url}")


def route_ip(server_url: str) -> str:
    """The local address used to reach the server (what other machines can reach us on)."""
    host = urlparse(server_url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((socket.gethostbyname(host), 9))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def collect_status() -> WorkerStatus:
    mem = psutil.virtual_memory()
    return WorkerStatus(
        cpu_count=psutil.cpu_count() or 0,
        cpu_percent=psutil.cpu_percent(None),
        memory_total=mem.total,
        memory_available=mem.available,
        gpus=nvidia_gpus(),
    )


def nvidia_gpus() -> list[GPUInfo]:
    """GPUs from nvidia-smi; none when it is absent or fails."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = "index,name,memory.total,memory.used,utilization.gpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        idx, name, total, used, util = (x.strip() for x in line.split(","))
        gpus.append(
            GPUInfo(
                index=int(idx),
                name=name,
                memory_total=int(float(total)) << 20,
                memory_used=int(float(used)) << 20,
                utilization=float(util) if util.replace(".", "").isdigit() else 0.0,
            )
        )
    return gpus


def checkpoint_size(path: Path) -> int:
    """Bytes of weight files under `path` (all files when there are no weight files)."""
    if path.is_file():
        return path.stat().st_size
    files = [p for p in path.rglob("*") if p.is_file()]
    weights = [p for p in files if p.name.endswith(WEIGHT_SUFFIXES)]
    return sum(p.stat().st_size for p in (weights or files))


def resolve_hub_model(source: str, repo_id: str, cache_dir: Path) -> str:
    """Download (or find cached) a hub model; a LaunchError says why it cannot."""
    module = {"huggingface": "huggingface_hub", "model_scope": "modelscope"}[source]
    try:
        hub = __import__(module, fromlist=["snapshot_download"])
    except ImportError:
        raise LaunchError(
            f"source {source} needs the {module} package on this worker "
            f"(pip install {module.replace('_', '-')})"
        ) from None
    try:
        return hub.snapshot_download(repo_id, cache_dir=str(cache_dir / source))
    except Exception as e:  # noqa: BLE001 - the hub libraries raise many kinds
        raise LaunchError(
            f"cannot fetch {repo_id!r} from {source} ({type(e).__name__}: {e}); "
            "without network, deploy from a local path"
        ) from None


def port_free(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do; TIME_WAIT is fine
        try:
            s.bind((ip, port))
            return True
        except OSError:
            return False


@dataclass
class Local:
    """What this worker knows about one instance it runs."""

    assignment: Assignment
    handle: object | None = None
    state: str = "starting"
    message: str = ""
    restart_count: int = 0
    crashes: int = 0  # consecutive; reset once healthy
    next_start: float = 0.0
    health_failures: int = 0
    reported: tuple | None = None

    @property
    def id(self) -> int:
        return self.assignment.instance.id


class Worker:
    def __init__(self, config: WorkerConfig, runtime: Runtime | None = None) -> None:
        self.config = config
        self.ip = config.ip or route_ip(config.server_url)
        self.host = config.host or self.ip
        self.runtime = runtime or ProcessRuntime()
        self.locals: dict[int, Local] = {}
        self.worker_id: int | None = None
        self.credential = ""
        self.http = httpx.AsyncClient(base_url=config.server_url.rstrip("/"), timeout=10.0)
        self.logs_dir = config.data_dir / "logs"

    def log_path(self, instance_id: int) -> Path:
        return self.logs_dir / f"instance-{instance_id}.log"

    # --- loop
    async def run(self) -> None:
        try:
            await self.register()
            while True:
                try:
                    assignments = await self.heartbeat()
                    if assignments is not None:
                        await self.reconcile(assignments)
                    await self.supervise()
                except httpx.HTTPError as e:
                    log.warning("server unreachable: %s", e)
                await asyncio.sleep(self.config.heartbeat_interval)
        finally:
            await asyncio.shield(self.shutdown())

    async def shutdown(self) -> None:
        for local in list(self.locals.values()):
            await self.stop(local)
        self.locals.clear()
        await self.http.aclose()

    async def register(self) -> None:
        c = self.config
        body = {
            "name": c.name,
            "ip": self.ip,
            "port": c.port,
            "labels": c.labels,
            "port_range_start": c.port_range[0],
            "port_range_end": c.port_range[1],
            "status": (await asyncio.to_thread(collect_status)).model_dump(),
        }
        delay = 0.2
        while True:
            try:
                r = await self.http.post(
                    "/v2/workers/register",
                    json=body,
                    headers={"Authorization": f"Bearer {c.token}"},
                )
                if r.status_code in (400, 401):
                    raise SystemExit(f"worker registration refused: {r.json()['error']['message']}")
                r.raise_for_status()
                break
            except httpx.HTTPError as e:
                log.info("waiting for server at %s: %s", c.server_url, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        data = r.json()
        self.worker_id, self.credential = data["id"], data["credential"]
        log.info("registered as worker %s (id %s, ip %s)", c.name, self.worker_id, self.ip)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"}

    async def heartbeat(self) -> list[Assignment] | None:
        status = await asyncio.to_thread(collect_status)
        r = await self.http.post(
            f"/v2/workers/{self.worker_id}/heartbeat",
            json=status.model_dump(),
            headers=self._auth(),
        )
        if r.status_code == 401:  # e.g. the worker was deleted: register again
            await self.register()
            return None
        r.raise_for_status()
        return [Assignment.model_validate(a) for a in r.json()]

    async def reconcile(self, assignments: list[Assignment]) -> None:
        wanted = {a.instance.id: a for a in assignments}
        for iid, local in list(self.locals.items()):
            a = wanted.get(iid)
            if a is None or a.instance.port != local.assignment.instance.port:
                await self.stop(local)
                del self.locals[iid]
        for iid, a in wanted.items():
            if iid not in self.locals:
                self.locals[iid] = local = Local(a)
                await self.start(local)

    async def supervise(self) -> None:
        for local in list(self.locals.values()):
            await self.check(local)
            await self.report(local)

    # --- one instance
    async def start(self, local: Local) -> None:
        a = local.assignment
        inst, model = a.instance, a.model
        try:
            if model.source == "local_path":
                path = model.local_path or ""
                if not os.path.exists(path):
                    raise LaunchError(f"model path {path} not found on worker {self.config.name}")
            else:
                local.state = "downloading"
                await self.report(local)
                path = await asyncio.to_thread(
                    resolve_hub_model,
                    model.source,
                    model.huggingface_repo_id or model.model_scope_model_id or "",
                    self.config.data_dir / "hub",
                )
            if not port_free(self.ip, inst.port):
                raise LaunchError(f"port {inst.port} is in use on {self.ip}")
            values = {
                "model_path": path,
                "port": str(inst.port),
                "worker_ip": self.ip,
                "model_name": model.name,
                "gpu_count": str(len(inst.gpu_indexes)),
                "gpu_ids": ",".join(map(str, inst.gpu_indexes)),
            }
            spec = build_launch_spec(
                inst.name,
                a.launch,
                model.backend_parameters,
                model.env,
                values,
                self.log_path(inst.id),
                inst.gpu_indexes,
            )
            local.handle = await asyncio.to_thread(self.runtime.start, spec)
        except LaunchError as e:
            self.crashed(local, str(e))
            return
        local.state, local.message, local.health_failures = "starting", "", 0
        log.info("started %s (pid %s)", inst.name, self.runtime.pid(local.handle))

    def crashed(self, local: Local, why: str) -> None:
        """Record a failure and schedule the restart after the backoff."""
        c = self.config
        delay = min(c.restart_backoff * 2**local.crashes, c.restart_backoff_max)
        local.crashes += 1
        local.handle = None
        local.state = "error"
        local.message = f"{why}; restarting in {delay:g}s"
        local.next_start = time.monotonic() + delay
        log.warning("%s: %s", local.assignment.instance.name, local.message)

    async def check(self, local: Local) -> None:
        if local.handle is None:
            if time.monotonic() >= local.next_start:
                local.restart_count += 1
                await self.start(local)
            return
        code = self.runtime.exit_code(local.handle)
        if code is not None:
            self.crashed(local, f"process exited with code {code}")
            return
        inst, launch = local.assignment.instance, local.assignment.launch
        url = f"http://{self.ip}:{inst.port}{launch.health_check_path}"
        try:
            healthy = (await self.http.get(url, timeout=3.0)).status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy:
            local.state, local.message, local.crashes, local.health_failures = "running", "", 0, 0
        elif local.state == "running":
            local.health_failures += 1
            if local.health_failures >= self.config.health_failures:
                await asyncio.to_thread(self.runtime.stop, local.handle, 10.0)
                self.crashed(
                    local,
                    f"health check {launch.health_check_path} failed {local.health_failures} times",
                )

    async def report(self, local: Local) -> None:
        pid = self.runtime.pid(local.handle) if local.handle is not None else None
        now = (local.state, local.message, pid, local.restart_count)
        if now == local.reported:
            return
        r = await self.http.put(
            f"/v2/workers/{self.worker_id}/instances/{local.id}/state",
            headers=self._auth(),
            json={
                "state": local.state,
                "state_message": local.message,
                "pid": pid,
                "restart_count": local.restart_count,
            },
        )
        if r.status_code == 409:  # reassigned elsewhere meanwhile
            await self.stop(local)
            self.locals.pop(local.id, None)
            return
        r.raise_for_status()
        local.reported = now

    async def stop(self, local: Local) -> None:
        if local.handle is not None:
            await asyncio.to_thread(self.runtime.stop, local.handle, 10.0)
            log.info("stopped %s", local.assignment.instance.name)
            local.handle = None


# ----------------------------------------------------------------------------- worker API


def worker_app(worker: Worker) -> FastAPI:
    """Endpoints the server calls, authenticated with the cluster token."""
    app = FastAPI(title="specserve worker")

    def denied(request: Request) -> JSONResponse | None:
        if request.headers.get("authorization", "") != f"Bearer {worker.config.token}":
            return JSONResponse(
                {
                    "error": {
                        "message": "invalid token",
                        "type": "invalid_request_error",
                        "code": "invalid_token",
                    }
                },
                status_code=401,
            )
        return None

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "instances": len(worker.locals)}

    @app.get("/v1/paths/stat", response_model=None)
    def stat(path: str, request: Request) -> dict | JSONResponse:
        if (err := denied(request)) is not None:
            return err
        p = Path(path)
        if not p.exists():
            return {"exists": False, "size": 0}
        return {"exists": True, "size": checkpoint_size(p)}

    @app.get("/v1/instances/{instance_id}/logs", response_model=None)
    def logs(
        instance_id: int, request: Request, follow: bool = False, tail: int = 0
    ) -> StreamingResponse | JSONResponse:
        if (err := denied(request)) is not None:
            return err
        path = worker.log_path(instance_id)
        if not path.exists():
            return JSONResponse(
                {
                    "error": {
                        "message": f"no logs for instance {instance_id} yet",
                        "type": "invalid_request_error",
                        "code": "not_found",
                    }
                },
                status_code=404,
            )
        return StreamingResponse(
            follow_file(path, follow, tail, lambda: instance_id in worker.locals),
            media_type="text/plain; charset=utf-8",
        )

    return app


async def follow_file(path: Path, follow: bool, tail: int, alive: callable) -> AsyncIterator[bytes]:
    """The file (or its last `tail` lines), then, with `follow`, what is appended to it."""
    with open(path, "rb") as f:
        if tail > 0:
            f.seek(max(0, path.stat().st_size - 1_000_000))
            yield b"".join(f.read().splitlines(keepends=True)[-tail:])
        while chunk := f.read(1 << 16):
            yield chunk
        while follow and alive():
            chunk = f.read(1 << 16)
            if chunk:
                yield chunk
            else:
                await asyncio.sleep(0.25)


async def run_worker(config: WorkerConfig) -> None:
    """A standalone worker process: the worker loop and its API server."""
    from specserve.cluster.service import http_server, serve_until_signal

    config.data_dir.mkdir(parents=True, exist_ok=True)
    worker = Worker(config)
    server = http_server(worker_app(worker), worker.host, config.port)
    with contextlib.suppress(asyncio.CancelledError):
        await serve_until_signal([server], [worker.run()])
