"""The control-plane server: app factory, bootstrap, and the `/v2` management API."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import logging
import os
import secrets
import shlex
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session, sessionmaker
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from specserve.cluster import schemas as S
from specserve.cluster.auth import (
    SESSION_COOKIE,
    ApiError,
    Authenticator,
    bearer,
    hash_password,
    hash_secret,
    new_api_key,
)
from specserve.cluster.db import (
    ApiKey,
    InferenceBackend,
    Model,
    ModelInstance,
    User,
    Worker,
    open_database,
    utcnow,
)
from specserve.cluster.scheduler import Controller, backend_version, reset_instance

log = logging.getLogger("specserve.cluster.server")
UI_DIR = Path(__file__).parent / "ui"
T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str | None = None  # default: SQLite in data_dir
    bootstrap_password: str | None = None
    token: str | None = None  # shared worker registration token; default: generated, in data_dir
    heartbeat_timeout: float = 30.0  # seconds without heartbeat before a worker is not ready
    schedule_interval: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        if self.heartbeat_timeout <= 0 or self.schedule_interval <= 0:
            raise ValueError("heartbeat_timeout and schedule_interval must be positive")
        url = self.database_url
        if url and not url.startswith(("sqlite:", "postgresql:", "postgres:", "postgresql+")):
            raise ValueError(f"unsupported database URL {url!r} (use sqlite:/// or postgresql://)")

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'specserve.db'}"


def builtin_backend() -> S.BackendCreate:
    """The engine of this project as a backend, launched by the worker's Python."""
    return S.BackendCreate(
        name="specserve",
        description="specserve engine (built in)",
        versions={
            "builtin": S.BackendVersion(
                entrypoint=f"{shlex.quote(sys.executable)} -m specserve serve",
                command="--model-path {{model_path}} --host {{worker_ip}} --port {{port}} "
                "--served-model-name {{model_name}}",
                health_check_path="/health",
            )
        },
    )


@dataclass
class ClusterState:
    config: ServerConfig
    sessions: sessionmaker
    token: str
    auth: Authenticator
    http: httpx.AsyncClient | None = None
    controller: Controller | None = None


def bootstrap(config: ServerConfig) -> ClusterState:
    """Create the data dir and schema, the admin user, the worker token, the built-in backend."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    sessions = open_database(config.db_url)
    token = config.token or _read_or_create(config.data_dir / "token", secrets.token_hex(16))
    with sessions.begin() as s:
        if s.scalar(sa.select(User).where(User.username == "admin")) is None:
            password = config.bootstrap_password or _read_or_create(
                config.data_dir / "initial_admin_password", secrets.token_urlsafe(12)
            )
            s.add(User(username="admin", password_hash=hash_password(password)))
        spec = builtin_backend()
        row = s.scalar(sa.select(InferenceBackend).where(InferenceBackend.name == spec.name))
        if row is None:
            row = InferenceBackend(name=spec.name, builtin=True)
            s.add(row)
        row.description, row.default_version = spec.description, spec.default_version
        row.versions = {k: v.model_dump() for k, v in spec.versions.items()}
    return ClusterState(config, sessions, token, Authenticator(sessions))


def _read_or_create(path: Path, value: str) -> str:
    if path.exists():
        return path.read_text().strip()
    path.write_text(value + "\n")
    os.chmod(path, 0o600)
    return value


def create_app(config: ServerConfig) -> FastAPI:
    state = bootstrap(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http:
            state.http = http
            state.controller = Controller(
                state.sessions,
                state.token,
                config.heartbeat_timeout,
                config.schedule_interval,
                http,
            )
            task = asyncio.create_task(state.controller.run(), name="cluster-controller")
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="specserve cluster", lifespan=lifespan)
    app.state.cluster = state
    _install_error_handlers(app)
    app.include_router(management_router(state))
    from specserve.cluster.gateway import gateway_router

    app.include_router(gateway_router(state))
    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(UI_DIR / "index.html")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    return app


def error_body(status: int, message: str, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": code}}, status_code=status
    )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError) -> JSONResponse:
        return error_body(e.status, e.message, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"] if x != "body")
            parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
        return error_body(400, "; ".join(parts), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_body(e.status_code, str(e.detail))

    @app.exception_handler(sa.exc.IntegrityError)
    async def _conflict(_: Request, e: sa.exc.IntegrityError) -> JSONResponse:
        return error_body(409, "conflicts with an existing record (duplicate name?)", "conflict")


# ----------------------------------------------------------------------------- helpers


def get_or_404(s: Session, table: type[T], ref: str, what: str) -> T:
    """Look a row up by numeric id or by name."""
    column = table.id if ref.isdigit() else table.name  # type: ignore[attr-defined]
    row = s.scalar(sa.select(table).where(column == (int(ref) if ref.isdigit() else ref)))
    if row is None:
        raise ApiError(404, f"{what} {ref!r} not found", "not_found")
    return row


def _unique(s: Session, table: type, name: str, what: str) -> None:
    if s.scalar(sa.select(table.id).where(table.name == name)) is not None:
        raise ApiError(409, f"{what} {name!r} already exists", "conflict")


def model_out(s: Session, m: Model) -> S.ModelOut:
    ready = s.scalar(
        sa.select(sa.func.count()).where(
            ModelInstance.model_id == m.id, ModelInstance.state == "running"
        )
    )
    return S.ModelOut.model_validate(m).model_copy(update={"ready_replicas": ready or 0})


def _check_backend(s: Session, backend: str, version: str | None) -> None:
    row = s.scalar(sa.select(InferenceBackend).where(InferenceBackend.name == backend))
    if row is None:
        raise ApiError(400, f"inference backend {backend!r} does not exist", "invalid_backend")
    if version is not None and version not in row.versions:
        raise ApiError(
            400,
            f"backend {backend!r} has no version {version!r} (has: {', '.join(row.versions)})",
            "invalid_backend",
        )


# ----------------------------------------------------------------------------- routes


def management_router(state: ClusterState) -> APIRouter:
    def admin(request: Request) -> None:
        state.auth.require(request, "management")

    def worker_auth(request: Request, worker_id: int) -> Worker:
        with state.sessions() as s:
            w = s.get(Worker, worker_id)
        cred = bearer(request) or ""
        if w is None or not hmac.compare_digest(w.credential_hash, hash_secret(cred)):
            raise ApiError(401, "invalid worker credential", "invalid_credential")
        return w

    def wake() -> None:
        if state.controller is not None:
            state.controller.wake.set()

    r = APIRouter()
    A = [Depends(admin)]

    @r.post("/auth/login")
    def login(body: S.Login, response: Response) -> dict:
        token = state.auth.login(body.username, body.password)
        if token is None:
            raise ApiError(401, "wrong username or password", "invalid_credentials")
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict")
        return {"username": body.username}

    @r.post("/auth/logout")
    def logout(request: Request, response: Response) -> dict:
        state.auth.logout(request.cookies.get(SESSION_COOKIE))
        response.delete_cookie(SESSION_COOKIE)
        return {}

    @r.get("/auth/me", dependencies=A)
    def me() -> dict:
        return {"username": "admin"}

    # --- inference backends
    @r.get("/v2/inference-backends", dependencies=A)
    def list_backends() -> list[S.BackendOut]:
        with state.sessions() as s:
            rows = s.scalars(sa.select(InferenceBackend).order_by(InferenceBackend.id))
            return [S.BackendOut.model_validate(b) for b in rows]

    @r.post("/v2/inference-backends", dependencies=A, status_code=201)
    def create_backend(body: S.BackendCreate) -> S.BackendOut:
        with state.sessions.begin() as s:
            _unique(s, InferenceBackend, body.name, "inference backend")
            row = InferenceBackend(
                name=body.name,
                description=body.description,
                builtin=False,
                default_version=body.default_version,
                versions={k: v.model_dump() for k, v in body.versions.items()},
            )
            s.add(row)
            s.flush()
            return S.BackendOut.model_validate(row)

    @r.get("/v2/inference-backends/{ref}", dependencies=A)
    def get_backend(ref: str) -> S.BackendOut:
        with state.sessions() as s:
            return S.BackendOut.model_validate(get_or_404(s, InferenceBackend, ref, "backend"))

    @r.patch("/v2/inference-backends/{ref}", dependencies=A)
    def update_backend(ref: str, body: S.BackendUpdate) -> S.BackendOut:
        with state.sessions.begin() as s:
            row = get_or_404(s, InferenceBackend, ref, "backend")
            if row.builtin:
                raise ApiError(400, "the built-in backend cannot be changed", "builtin")
            versions = (
                row.versions
                if body.versions is None
                else {k: v.model_dump() for k, v in body.versions.items()}
            )
            default = body.default_version or row.default_version
            if default not in versions:
                raise ApiError(400, f"default_version {default!r} is not in versions")
            row.versions, row.default_version = versions, default
            if body.description is not None:
                row.description = body.description
            s.flush()
            return S.BackendOut.model_validate(row)

    @r.delete("/v2/inference-backends/{ref}", dependencies=A, status_code=204)
    def delete_backend(ref: str) -> None:
        with state.sessions.begin() as s:
            row = get_or_404(s, InferenceBackend, ref, "backend")
            if row.builtin:
                raise ApiError(400, "the built-in backend cannot be deleted", "builtin")
            users = s.scalars(sa.select(Model.name).where(Model.backend == row.name)).all()
            if users:
                raise ApiError(409, f"backend {row.name!r} is used by {', '.join(users)}", "in_use")
            s.delete(row)

    # --- deployments
    @r.get("/v2/models", dependencies=A)
    def list_models() -> list[S.ModelOut]:
        with state.sessions() as s:
            return [model_out(s, m) for m in s.scalars(sa.select(Model).order_by(Model.id))]

    @r.post("/v2/models", dependencies=A, status_code=201)
    def create_model(body: S.ModelCreate) -> S.ModelOut:
        with state.sessions.begin() as s:
            _unique(s, Model, body.name, "model")
            _check_backend(s, body.backend, body.backend_version)
            m = Model(**body.model_dump())
            s.add(m)
            s.flush()
            out = model_out(s, m)
        wake()
        return out

    @r.get("/v2/models/{ref}", dependencies=A)
    def get_model(ref: str) -> S.ModelOut:
        with state.sessions() as s:
            return model_out(s, get_or_404(s, Model, ref, "model"))

    @r.patch("/v2/models/{ref}", dependencies=A)
    def update_model(ref: str, body: S.ModelUpdate) -> S.ModelOut:
        with state.sessions.begin() as s:
            m = get_or_404(s, Model, ref, "model")
            changes = body.model_dump(exclude_unset=True)
            if "backend_version" in changes:
                _check_backend(s, m.backend, changes["backend_version"])
            for p in changes.get("backend_parameters") or []:
                try:
                    S.check_template(p, "backend_parameters")
                except ValueError as e:
                    raise ApiError(400, str(e), "invalid_template") from e
            for key, value in changes.items():
                setattr(m, key, value)
            s.flush()
            out = model_out(s, m)
        wake()
        return out

    @r.delete("/v2/models/{ref}", dependencies=A, status_code=204)
    def delete_model(ref: str) -> None:
        with state.sessions.begin() as s:
            m = get_or_404(s, Model, ref, "model")
            s.execute(sa.delete(ModelInstance).where(ModelInstance.model_id == m.id))
            s.delete(m)

    # --- model instances
    @r.get("/v2/model-instances", dependencies=A)
    def list_instances(model: str | None = None, worker: str | None = None) -> list[S.InstanceOut]:
        q = sa.select(ModelInstance).order_by(ModelInstance.id)
        if model:
            q = q.where(ModelInstance.model_name == model)
        if worker:
            q = q.where(ModelInstance.worker_name == worker)
        with state.sessions() as s:
            return [S.InstanceOut.model_validate(i) for i in s.scalars(q)]

    @r.get("/v2/model-instances/{ref}", dependencies=A)
    def get_instance(ref: str) -> S.InstanceOut:
        with state.sessions() as s:
            return S.InstanceOut.model_validate(get_or_404(s, ModelInstance, ref, "instance"))

    @r.delete("/v2/model-instances/{ref}", dependencies=A, status_code=204)
    def delete_instance(ref: str) -> None:
        """Deleting an instance restarts it: the replica count brings a new one."""
        with state.sessions.begin() as s:
            s.delete(get_or_404(s, ModelInstance, ref, "instance"))
        wake()

    @r.get("/v2/model-instances/{ref}/logs", dependencies=A)
    async def instance_logs(ref: str, follow: bool = False, tail: int = 0) -> StreamingResponse:
        with state.sessions() as s:
            inst = get_or_404(s, ModelInstance, ref, "instance")
            w = s.get(Worker, inst.worker_id) if inst.worker_id else None
        if w is None:
            raise ApiError(409, f"instance {inst.name} is not on a worker ({inst.state})")
        req = state.http.build_request(
            "GET",
            f"http://{w.ip}:{w.port}/v1/instances/{inst.id}/logs",
            params={"follow": str(follow).lower(), "tail": tail},
            headers={"Authorization": f"Bearer {state.token}"},
        )
        try:
            resp = await state.http.send(req, stream=True)
        except httpx.HTTPError as e:
            raise ApiError(502, f"worker {w.name} unreachable: {e}", "worker_unreachable") from e
        if resp.status_code != 200:
            await resp.aread()
            await resp.aclose()
            raise ApiError(resp.status_code, f"worker {w.name}: {resp.text[:300]}")
        return StreamingResponse(
            resp.aiter_raw(),
            media_type="text/plain; charset=utf-8",
            background=BackgroundTask(resp.aclose),
        )

    @r.put("/v2/workers/{worker_id}/instances/{instance_id}/state")
    def push_state(
        worker_id: int, instance_id: int, body: S.InstanceStateUpdate, request: Request
    ) -> dict:
        w = worker_auth(request, worker_id)
        if body.state in ("pending", "scheduled"):
            raise ApiError(400, f"workers may not set state {body.state!r}")
        with state.sessions.begin() as s:
            inst = s.get(ModelInstance, instance_id)
            if inst is None or inst.worker_id != w.id:
                raise ApiError(
                    409, f"instance {instance_id} is not assigned to {w.name}", "not_assigned"
                )
            inst.state, inst.state_message = body.state, body.state_message
            if body.pid is not None:
                inst.pid = body.pid
            if body.restart_count is not None:
                inst.restart_count = body.restart_count
        return {}

    # --- workers
    @r.get("/v2/workers", dependencies=A)
    def list_workers() -> list[S.WorkerOut]:
        with state.sessions() as s:
            return [
                S.WorkerOut.model_validate(w)
                for w in s.scalars(sa.select(Worker).order_by(Worker.id))
            ]

    @r.get("/v2/workers/{ref}", dependencies=A)
    def get_worker(ref: str) -> S.WorkerOut:
        with state.sessions() as s:
            return S.WorkerOut.model_validate(get_or_404(s, Worker, ref, "worker"))

    @r.delete("/v2/workers/{ref}", dependencies=A, status_code=204)
    def delete_worker(ref: str) -> None:
        with state.sessions.begin() as s:
            w = get_or_404(s, Worker, ref, "worker")
            for inst in s.scalars(sa.select(ModelInstance).where(ModelInstance.worker_id == w.id)):
                reset_instance(inst, f"worker {w.name} was removed; rescheduling")
            s.delete(w)
        wake()

    @r.post("/v2/workers/register")
    def register(body: S.WorkerRegister, request: Request) -> S.WorkerRegistered:
        if not hmac.compare_digest((bearer(request) or "").encode(), state.token.encode()):
            raise ApiError(401, "invalid registration token", "invalid_token")
        credential = secrets.token_urlsafe(32)
        with state.sessions.begin() as s:
            w = s.scalar(sa.select(Worker).where(Worker.name == body.name))
            if w is None:
                w = Worker(name=body.name)
                s.add(w)
            for key, value in body.model_dump().items():
                setattr(w, key, value)
            w.credential_hash = hash_secret(credential)
            w.state, w.state_message, w.heartbeat_at = "ready", "", utcnow()
            s.flush()
            out = S.WorkerRegistered(
                **S.WorkerOut.model_validate(w).model_dump(), credential=credential
            )
        log.info("worker %s registered from %s", body.name, body.ip)
        wake()
        return out

    @r.post("/v2/workers/{worker_id}/heartbeat")
    def heartbeat(worker_id: int, body: S.WorkerStatus, request: Request) -> list[S.Assignment]:
        """Record status; answer with the instances this worker must run."""
        worker_auth(request, worker_id)
        with state.sessions.begin() as s:
            w = s.get(Worker, worker_id)
            w.status, w.heartbeat_at = body.model_dump(), utcnow()
            if w.state != "ready":
                w.state, w.state_message = "ready", ""
            out = []
            for inst in s.scalars(sa.select(ModelInstance).where(ModelInstance.worker_id == w.id)):
                m = s.get(Model, inst.model_id)
                version = backend_version(s, m) if m else "model deleted"
                if isinstance(version, S.BackendVersion):
                    out.append(
                        S.Assignment(
                            instance=S.InstanceOut.model_validate(inst),
                            model=S.ModelOut.model_validate(m),
                            backend_version=version,
                        )
                    )
        return out

    # --- api keys
    @r.get("/v2/api-keys", dependencies=A)
    def list_keys() -> list[S.ApiKeyOut]:
        with state.sessions() as s:
            return [
                S.ApiKeyOut.model_validate(k)
                for k in s.scalars(sa.select(ApiKey).order_by(ApiKey.id))
            ]

    @r.post("/v2/api-keys", dependencies=A, status_code=201)
    def create_key(body: S.ApiKeyCreate) -> S.ApiKeyCreated:
        value, access, secret_hash = new_api_key()
        expires = (
            utcnow() + dt.timedelta(days=body.expires_in_days) if body.expires_in_days else None
        )
        with state.sessions.begin() as s:
            _unique(s, ApiKey, body.name, "API key")
            row = ApiKey(
                name=body.name,
                access_key=access,
                secret_hash=secret_hash,
                scopes=sorted(set(body.scopes)),
                expires_at=expires,
            )
            s.add(row)
            s.flush()
            return S.ApiKeyCreated(**S.ApiKeyOut.model_validate(row).model_dump(), value=value)

    @r.delete("/v2/api-keys/{ref}", dependencies=A, status_code=204)
    def delete_key(ref: str) -> None:
        with state.sessions.begin() as s:
            s.delete(get_or_404(s, ApiKey, ref, "API key"))

    return r
