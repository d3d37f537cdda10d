"""Request/response schemas of the REST API, in GPUStack 2.x shapes, and the template rules.

Bodies are validated here once, so a bad template, name or source becomes a 400 naming the
problem before anything reaches the database. GPUStack's client sends every field of its
models, most of them for features specserve does not have; such a field is accepted while it
holds GPUStack's default (null, false, empty, or the value in `_DEFAULTS`) and answered with
a 400 naming it otherwise, never silently ignored.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import shlex
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

log = logging.getLogger("specserve.cluster.schemas")
PLACEHOLDERS = frozenset({"model_path", "port", "worker_ip", "model_name", "gpu_count", "gpu_ids"})
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\}\}")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
CLUSTER_ID = 1  # one cluster; GPUStack's default cluster has id 1

# GPUStack's ModelInstanceStateEnum
InstanceState = Literal[
    "pending", "analyzing", "scheduled", "initializing", "downloading", "starting", "running",
    "error", "unreachable",
]  # fmt: skip
Framework = Literal["cpu", "cuda"]
T = TypeVar("T")


def unknown_placeholders(text: str) -> list[str]:
    return sorted({m for m in _PLACEHOLDER.findall(text) if m not in PLACEHOLDERS})


def warn_unknown(text: str, where: str) -> str:
    """As GPUStack: an unknown `{{name}}` is kept verbatim, with a warning."""
    if unknown := unknown_placeholders(text):
        names = ", ".join("{{" + n + "}}" for n in unknown)
        log.warning("%s: unknown placeholder %s is passed through unchanged", where, names)
    return text


def render_template(text: str, values: dict[str, str]) -> str:
    """Substitute the known `{{name}}` placeholders; leave unknown ones as they are."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def _is_default(key: str, value: Any, defaults: dict[str, Any]) -> bool:
    if key in defaults:
        return value == defaults[key] or value is None
    return value in (None, False, "", 0) or value == [] or value == {}


class GPUStackBody(BaseModel):
    """A request body as GPUStack's client sends it: fields specserve lacks must be unset."""

    model_config = ConfigDict(extra="allow")
    _DEFAULTS: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="after")
    def _unsupported(self) -> GPUStackBody:
        bad = sorted(
            k for k, v in (self.model_extra or {}).items() if not _is_default(k, v, self._DEFAULTS)
        )
        if bad:
            raise ValueError(f"not supported by specserve cluster: {', '.join(bad)}")
        return self


class Pagination(BaseModel):
    page: int
    perPage: int  # noqa: N815 - GPUStack's name
    total: int
    totalPage: int  # noqa: N815


class Page(BaseModel, Generic[T]):
    """GPUStack's paginated list."""

    items: list[T]
    pagination: Pagination


def paginate(rows: list[T], page: int, per_page: int) -> Page[T]:
    """Page `page` (1-based) of `per_page` rows; page -1 (as GPUStack's client sends) is all."""
    total = len(rows)
    if page == -1:
        everything = Pagination(page=1, perPage=max(total, 1), total=total, totalPage=1)
        return Page(items=rows, pagination=everything)
    per_page = max(per_page, 1)
    start = (max(page, 1) - 1) * per_page
    return Page(
        items=rows[start : start + per_page],
        pagination=Pagination(
            page=max(page, 1), perPage=per_page, total=total, totalPage=math.ceil(total / per_page)
        ),
    )


# ----------------------------------------------------------------------------- backends

_LEGACY_VERSION = {"entrypoint": "entrypoint", "image": "image_name", "framework":
                   "custom_framework", "command": "run_command", "env": "env"}  # fmt: skip


def _legacy_backend(data: dict) -> dict:
    """specserve's earlier form (`name`, `versions{entrypoint, image, framework, command, env,
    health_check_path}`, or those fields flat) -> GPUStack's."""
    data = dict(data)
    versions = data.pop("versions", None)
    if versions is None:
        version = str(data.pop("version", "default"))
        fields = {k: data.pop(k) for k in [*_LEGACY_VERSION, "health_check_path"] if k in data}
        versions = {version: fields}
    out = {"backend_name": data.pop("name"), "version_configs": {}, **data}
    for version, spec in versions.items():
        spec = dict(spec) if isinstance(spec, dict) else {}
        if "health_check_path" in spec:
            out.setdefault("health_check_path", spec.pop("health_check_path"))
        out["version_configs"][version] = {_LEGACY_VERSION.get(k, k): v for k, v in spec.items()}
    return out


class VersionConfig(GPUStackBody):
    """One version of a backend (GPUStack's VersionConfig). `run_command` is rendered, split
    like a shell command line and appended to `entrypoint` (a process) or passed as the
    arguments of `image_name` (a container)."""

    image_name: str | None = None
    run_command: str | None = None
    entrypoint: str | None = None
    env: dict[str, str] | None = None
    custom_framework: Framework | None = None

    @field_validator("custom_framework", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class BackendCreate(GPUStackBody):
    """GPUStack's InferenceBackendCreate (also the body of PUT)."""

    _DEFAULTS: ClassVar[dict[str, Any]] = {"enabled": True, "backend_source": "custom"}
    backend_name: str = Field(pattern=NAME_PATTERN)
    version_configs: dict[str, VersionConfig]
    default_version: str | None = None
    default_backend_param: list[str] = Field(default_factory=list)
    default_run_command: str = ""
    default_entrypoint: str = ""
    health_check_path: str = "/health"
    description: str = ""
    default_env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _legacy_and_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" in data and "backend_name" not in data:
            data = _legacy_backend(data)
        if isinstance(data, dict):  # GPUStack sends null for "not set"
            data = {k: v for k, v in data.items() if v is not None}
        return data

    @model_validator(mode="after")
    def _check(self) -> BackendCreate:
        if not self.version_configs:
            raise ValueError("a backend needs at least one version in version_configs")
        if self.default_version is None:
            self.default_version = next(iter(self.version_configs))
        if self.default_version not in self.version_configs:
            raise ValueError(f"default_version {self.default_version!r} is not in version_configs")
        if not self.health_check_path.startswith("/"):
            raise ValueError("health_check_path must start with '/'")
        for name, v in self.version_configs.items():
            if not (v.image_name or v.entrypoint or v.run_command or self.default_entrypoint
                    or self.default_run_command):  # fmt: skip
                raise ValueError(f"version {name!r} has no image_name, entrypoint or run_command")
            for key, text in [("run_command", v.run_command or ""), *(v.env or {}).items()]:
                warn_unknown(text, f"{self.backend_name} {name} {key}")
        return self


class VersionConfigOut(BaseModel):
    image_name: str | None = None
    run_command: str | None = None
    entrypoint: str | None = None
    env: dict[str, str] | None = None
    custom_framework: str | None = None
    built_in_frameworks: list[str] | None = None


class BackendOut(BaseModel):
    """GPUStack's InferenceBackendPublic."""

    id: int
    backend_name: str
    version_configs: dict[str, VersionConfigOut]
    default_version: str
    default_backend_param: list[str]
    default_run_command: str
    default_entrypoint: str
    is_built_in: bool
    description: str
    health_check_path: str
    default_env: dict[str, str]
    backend_source: str
    enabled: bool = True
    built_in_version_configs: dict[str, VersionConfigOut] = Field(default_factory=dict)
    framework_index_map: dict[str, list[str]] = Field(default_factory=dict)
    created_at: dt.datetime
    updated_at: dt.datetime


class LaunchTemplate(BaseModel):
    """A backend version resolved for launching (defaults applied), as workers receive it."""

    entrypoint: str = ""
    run_command: str = ""
    image_name: str | None = None
    framework: Framework = "cpu"
    env: dict[str, str] = Field(default_factory=dict)
    default_parameters: list[str] = Field(default_factory=list)
    health_check_path: str = "/health"


# ----------------------------------------------------------------------------- models

Source = Literal["local_path", "huggingface", "model_scope"]
Category = Literal[
    "llm", "embedding", "image", "reranker", "speech_to_text", "text_to_speech", "unknown"
]  # fmt: skip


# A command-line string is split like a shell does: "--tp-size 8" -> ["--tp-size", "8"]
Parameters = Annotated[
    list[str], BeforeValidator(lambda v: shlex.split(v) if isinstance(v, str) else v)
]


class ModelCreate(GPUStackBody):
    """A deployment (GPUStack's ModelCreate). `source` defaults from the location given."""

    _DEFAULTS: ClassVar[dict[str, Any]] = {
        "restart_on_error": True, "revision_history_limit": 10, "access_policy": "authed",
        "owner_principal_id": 1, "ready_replicas": 0, "meta": {},
    }  # fmt: skip
    name: str = Field(pattern=NAME_PATTERN)
    source: Source | None = None
    local_path: str | None = None
    huggingface_repo_id: str | None = None
    model_scope_model_id: str | None = None
    description: str = ""
    replicas: int = Field(default=1, ge=0, le=64)
    backend: str = "specserve"
    backend_version: str | None = None
    backend_parameters: Parameters = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    worker_selector: dict[str, str] = Field(default_factory=dict)
    placement_strategy: Literal["spread", "binpack"] = "spread"
    categories: list[Category] = Field(default_factory=list)
    cluster_id: int | None = None
    enable_model_route: bool | None = None
    # GPUStack places a custom backend on CPU only with cpu_offloading; specserve places by the
    # backend version's framework (cpu: no GPU needed, cuda: GPUs), so both values are accepted
    cpu_offloading: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_and_nulls(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if v is not None}
        if data.get("source") == "modelscope":
            data["source"] = "model_scope"
        if "placement" in data:
            data.setdefault("placement_strategy", data.pop("placement"))
        if "repo_id" in data:
            hub = data.get("source") == "model_scope"
            data.setdefault(
                "model_scope_model_id" if hub else "huggingface_repo_id", data.pop("repo_id")
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelCreate:
        fields = {"local_path": "local_path", "huggingface": "huggingface_repo_id",
                  "model_scope": "model_scope_model_id"}  # fmt: skip
        if self.source is None:
            self.source = next((s for s, f in fields.items() if getattr(self, f)), "local_path")
        if not getattr(self, fields[self.source]):
            raise ValueError(f"source {self.source} needs {fields[self.source]}")
        if self.cluster_id not in (None, CLUSTER_ID):
            raise ValueError(f"cluster_id: specserve cluster has one cluster, id {CLUSTER_ID}")
        if self.enable_model_route is False:
            raise ValueError("enable_model_route: the gateway always routes by deployment name")
        for p in self.backend_parameters:
            warn_unknown(p, f"{self.name} backend_parameters")
        return self

    @property
    def repo_id(self) -> str | None:
        """The hub id of a huggingface or model_scope source."""
        hub = self.source == "model_scope"
        return self.model_scope_model_id if hub else self.huggingface_repo_id


class ModelUpdate(BaseModel):
    """A partial update (PATCH, a specserve extension): only what may change in place."""

    model_config = ConfigDict(extra="forbid")
    replicas: int | None = Field(default=None, ge=0, le=64)
    backend_version: str | None = None
    backend_parameters: Parameters | None = None
    env: dict[str, str] | None = None
    worker_selector: dict[str, str] | None = None
    placement_strategy: Literal["spread", "binpack"] | None = None
    categories: list[Category] | None = None
    description: str | None = None


class ModelOut(BaseModel):
    """GPUStack's ModelPublic (the fields specserve has)."""

    id: int
    name: str
    description: str
    source: str
    local_path: str | None
    huggingface_repo_id: str | None
    model_scope_model_id: str | None
    replicas: int
    ready_replicas: int = 0
    categories: list[str]
    placement_strategy: str
    worker_selector: dict[str, str]
    backend: str
    backend_version: str | None
    backend_parameters: list[str]
    env: dict[str, str]
    cluster_id: int = CLUSTER_ID
    created_at: dt.datetime
    updated_at: dt.datetime


class ComputedResourceClaim(BaseModel):
    ram: int | None = None  # bytes
    vram: dict[int, int] | None = None  # GPU index -> bytes


class InstanceOut(BaseModel):
    """GPUStack's ModelInstancePublic (the fields specserve has)."""

    id: int
    name: str
    model_id: int
    model_name: str
    source: str
    local_path: str | None = None
    huggingface_repo_id: str | None = None
    model_scope_model_id: str | None = None
    backend: str | None = None
    backend_version: str | None = None
    worker_id: int | None
    worker_name: str | None
    worker_ip: str | None
    port: int | None
    ports: list[int]
    gpu_indexes: list[int]
    computed_resource_claim: ComputedResourceClaim | None
    state: str
    state_message: str
    pid: int | None
    restart_count: int
    cluster_id: int = CLUSTER_ID
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
    """What a specserve worker reports in its heartbeat (specserve's own protocol)."""

    cpu_count: int = 0
    cpu_percent: float = 0.0
    memory_total: int = 0  # bytes
    memory_available: int = 0
    gpus: list[GPUInfo] = Field(default_factory=list)

    def gpustack(self) -> dict[str, Any]:
        """The same facts in GPUStack's WorkerStatus shape (bytes, rates in percent)."""

        def usage(total: int, used: int) -> dict[str, Any]:
            rate = 100.0 * used / total if total else 0.0
            return {"total": total, "used": used, "utilization_rate": rate}

        used = self.memory_total - self.memory_available
        gpus = [
            {"index": g.index, "name": g.name, "vendor": "nvidia", "type": "cuda",
             "core": {"total": 0, "utilization_rate": g.utilization},
             "memory": usage(g.memory_total, g.memory_used)}
            for g in self.gpus
        ]  # fmt: skip
        return {
            "cpu": {"total": self.cpu_count, "utilization_rate": self.cpu_percent},
            "memory": usage(self.memory_total, used),
            "gpu_devices": gpus,
        }


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
    """GPUStack's WorkerPublic (the fields specserve has) plus the instance port range."""

    id: int
    name: str
    hostname: str
    ip: str
    ifname: str = ""
    port: int
    labels: dict[str, str]
    state: str
    state_message: str
    status: dict[str, Any]
    heartbeat_time: dt.datetime
    unreachable: bool = False
    cluster_id: int = CLUSTER_ID
    port_range_start: int
    port_range_end: int
    created_at: dt.datetime
    updated_at: dt.datetime


class WorkerRegistered(WorkerOut):
    credential: str  # shown once; the worker sends it on every later call


class Assignment(BaseModel):
    """An instance a worker must run, with everything needed to launch it."""

    instance: InstanceOut
    model: ModelOut
    launch: LaunchTemplate


# ----------------------------------------------------------------------------- api keys

Scope = Literal["*", "management", "inference"]


class ApiKeyCreate(GPUStackBody):
    """GPUStack's ApiKeyCreate; `expires_in` is in seconds."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    scope: list[Scope] = Field(default_factory=lambda: ["*"], min_length=1)
    expires_in: int | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class ApiKeyOut(BaseModel):
    """GPUStack's ApiKeyPublic, plus `last_used_at`."""

    id: int
    name: str
    description: str
    access_key: str
    masked_value: str
    scope: list[str]
    is_custom: bool = False
    user_name: str = "admin"
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    value: str | None = None  # the full key, only in the creation response


class Login(BaseModel):
    username: str
    password: str
