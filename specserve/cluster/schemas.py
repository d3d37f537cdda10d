"""Request/response schemas of the REST API and the template placeholder rules.

Inputs are validated here once, so a bad backend template, name or source becomes a
400 with a message naming the problem before anything reaches the database.
"""

from __future__ import annotations

import datetime as dt
import re
import shlex
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PLACEHOLDERS = frozenset({"model_path", "port", "worker_ip", "model_name", "gpu_count", "gpu_ids"})
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

InstanceState = Literal["pending", "scheduled", "starting", "running", "error"]


def check_template(text: str, where: str) -> str:
    """Raise ValueError if `text` uses a placeholder outside PLACEHOLDERS."""
    unknown = sorted({m for m in _PLACEHOLDER.findall(text) if m not in PLACEHOLDERS})
    if unknown:

        def braces(names: list[str]) -> str:
            return ", ".join("{{" + n + "}}" for n in names)

        raise ValueError(
            f"{where}: unknown placeholder {braces(unknown)} "
            f"(allowed: {braces(sorted(PLACEHOLDERS))})"
        )
    return text


def render_template(text: str, values: dict[str, str]) -> str:
    """Substitute `{{name}}` placeholders (all of them must be known)."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], check_template(text, "template"))


# ----------------------------------------------------------------------------- backends


class BackendVersion(BaseModel):
    """How to launch one version of an inference backend."""

    model_config = ConfigDict(extra="forbid")
    entrypoint: str | None = None  # e.g. "sglang serve", "/usr/bin/llama-server"
    image: str | None = None  # container image (needs a container runtime)
    framework: Literal["cpu", "cuda"] = "cpu"
    command: str = ""  # argument template appended to the entrypoint
    env: dict[str, str] = Field(default_factory=dict)
    health_check_path: str = "/health"

    @field_validator("framework", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> BackendVersion:
        if not (self.entrypoint or self.image):
            raise ValueError("a backend version needs an entrypoint or an image")
        check_template(self.command, "command")
        for key, value in self.env.items():
            check_template(value, f"env {key}")
        if not self.health_check_path.startswith("/"):
            raise ValueError("health_check_path must start with '/'")
        return self


_VERSION_FIELDS = set(BackendVersion.model_fields)


class BackendCreate(BaseModel):
    """An inference backend. Also accepts the flat GPUStack form (version fields at top level)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    default_version: str | None = None
    versions: dict[str, BackendVersion]

    @model_validator(mode="before")
    @classmethod
    def _flat_form(cls, data: Any) -> Any:
        if isinstance(data, dict) and "versions" not in data:
            data = dict(data)
            version = str(data.pop("version", "default"))
            spec = {k: data.pop(k) for k in list(data) if k in _VERSION_FIELDS}
            data["versions"] = {version: spec}
        return data

    @model_validator(mode="after")
    def _default(self) -> BackendCreate:
        if not self.versions:
            raise ValueError("a backend needs at least one version")
        if self.default_version is None:
            self.default_version = next(iter(self.versions))
        if self.default_version not in self.versions:
            raise ValueError(f"default_version {self.default_version!r} is not in versions")
        return self


class BackendUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str | None = None
    default_version: str | None = None
    versions: dict[str, BackendVersion] | None = None


class BackendOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    description: str
    builtin: bool
    default_version: str
    versions: dict[str, BackendVersion]
    created_at: dt.datetime
    updated_at: dt.datetime


# ----------------------------------------------------------------------------- deployments


class ModelCreate(BaseModel):
    """A deployment. `source` is inferred from whichever of local_path / repo_id is given."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    source: Literal["local_path", "huggingface", "modelscope"] | None = None
    local_path: str | None = None
    repo_id: str | None = None
    replicas: int = Field(default=1, ge=0, le=64)
    backend: str = "specserve"
    backend_version: str | None = None
    backend_parameters: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    worker_selector: dict[str, str] = Field(default_factory=dict)
    placement: Literal["spread", "binpack"] = "spread"

    @field_validator("backend_parameters", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return shlex.split(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _source(self) -> ModelCreate:
        if self.source is None:
            self.source = "local_path" if self.local_path else "huggingface"
        if self.source == "local_path" and not self.local_path:
            raise ValueError("source local_path needs local_path")
        if self.source != "local_path" and not self.repo_id:
            raise ValueError(f"source {self.source} needs repo_id (or give local_path)")
        for p in self.backend_parameters:
            check_template(p, "backend_parameters")
        return self


class ModelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replicas: int | None = Field(default=None, ge=0, le=64)
    backend_version: str | None = None
    backend_parameters: list[str] | None = None
    env: dict[str, str] | None = None
    worker_selector: dict[str, str] | None = None
    placement: Literal["spread", "binpack"] | None = None

    _split = field_validator("backend_parameters", mode="before")(ModelCreate._split.__func__)


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    source: str
    local_path: str | None
    repo_id: str | None
    replicas: int
    backend: str
    backend_version: str | None
    backend_parameters: list[str]
    env: dict[str, str]
    worker_selector: dict[str, str]
    placement: str
    created_at: dt.datetime
    updated_at: dt.datetime
    ready_replicas: int = 0


class InstanceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    model_id: int
    model_name: str
    worker_id: int | None
    worker_name: str | None
    worker_ip: str | None
    port: int | None
    gpu_ids: list[int]
    computed_resource: dict[str, Any]
    state: str
    state_message: str
    pid: int | None
    restart_count: int
    created_at: dt.datetime
    updated_at: dt.datetime


class InstanceStateUpdate(BaseModel):
    """Pushed by the worker that runs the instance."""

    model_config = ConfigDict(extra="forbid")
    state: InstanceState
    state_message: str = ""
    pid: int | None = None
    restart_count: int | None = None


# ----------------------------------------------------------------------------- workers


class GPUInfo(BaseModel):
    index: int
    name: str = ""
    memory_total: int = 0  # bytes
    memory_used: int = 0
    utilization: float = 0.0


class WorkerStatus(BaseModel):
    cpu_count: int = 0
    cpu_percent: float = 0.0
    memory_total: int = 0  # bytes
    memory_available: int = 0
    gpus: list[GPUInfo] = Field(default_factory=list)


class WorkerRegister(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    ip: str
    port: int = Field(ge=1, le=65535)
    labels: dict[str, str] = Field(default_factory=dict)
    port_range_start: int = Field(ge=1, le=65535)
    port_range_end: int = Field(ge=1, le=65535)
    status: WorkerStatus = Field(default_factory=WorkerStatus)

    @model_validator(mode="after")
    def _range(self) -> WorkerRegister:
        if self.port_range_end < self.port_range_start:
            raise ValueError("port_range_end must be >= port_range_start")
        return self


class WorkerOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    ip: str
    port: int
    labels: dict[str, str]
    port_range_start: int
    port_range_end: int
    state: str
    state_message: str
    status: WorkerStatus
    heartbeat_at: dt.datetime
    created_at: dt.datetime


class WorkerRegistered(WorkerOut):
    credential: str  # shown once; the worker sends it on every later call


class Assignment(BaseModel):
    """An instance a worker must run, with everything needed to launch it."""

    instance: InstanceOut
    model: ModelOut
    backend_version: BackendVersion


# ----------------------------------------------------------------------------- api keys


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    scopes: list[Literal["inference", "management"]] = Field(default_factory=lambda: ["inference"])
    expires_in_days: int | None = Field(default=None, ge=1)


class ApiKeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    access_key: str
    scopes: list[str]
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    created_at: dt.datetime


class ApiKeyCreated(ApiKeyOut):
    value: str  # the full key, shown only in the creation response


class Login(BaseModel):
    username: str
    password: str
