"""The control-plane server: configuration, bootstrap, the app factory, error bodies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from specserve.cluster import schemas as S
from specserve.cluster.auth import (
    ApiError,
    Authenticator,
    hash_password,
)
from specserve.cluster.db import (
    InferenceBackend,
    User,
    open_database,
)
from specserve.cluster.gateway import gateway_router
from specserve.cluster.routes import routers
from specserve.cluster.routes.backends import store as store_backend
from specserve.cluster.routes.common import validation_message
from specserve.cluster.scheduler import Controller

log = logging.getLogger("specserve.cluster.server")
UI_DIR = Path(__file__).parent / "ui"


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
        backend_name="specserve",
        description="specserve engine (built in)",
        version_configs={
            "builtin": S.VersionConfig(
                entrypoint=f"{shlex.quote(sys.executable)} -m specserve serve",
                run_command="--model-path {{model_path}} --host {{worker_ip}} --port {{port}} "
                "--served-model-name {{model_name}}",
            )
        },
        health_check_path="/health",
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
        row = s.scalar(
            sa.select(InferenceBackend).where(InferenceBackend.name == spec.backend_name)
        )
        if row is None:
            row = InferenceBackend(builtin=True)
            s.add(row)
        store_backend(row, spec)
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
    for router in routers(state):
        app.include_router(router)
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
        return error_body(400, validation_message(e.errors()), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_body(e.status_code, str(e.detail))

    @app.exception_handler(sa.exc.IntegrityError)
    async def _conflict(_: Request, e: sa.exc.IntegrityError) -> JSONResponse:
        return error_body(409, "conflicts with an existing record (duplicate name?)", "conflict")
