"""`/v2/inference-backends`: how to launch each backend version, in GPUStack's shape
(`version_configs`, per-backend defaults), including GPUStack's `from-yaml` routes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pydantic
import sqlalchemy as sa
import yaml
from fastapi import APIRouter, Body
from sqlalchemy.orm import Session

from specserve.cluster import schemas as S
from specserve.cluster.auth import ApiError
from specserve.cluster.db import InferenceBackend, Model
from specserve.cluster.routes.common import admin, ensure_unique, get_or_404, invalid_body

if TYPE_CHECKING:
    from specserve.cluster.server import ClusterState


def backend_out(row: InferenceBackend) -> S.BackendOut:
    return S.BackendOut(
        id=row.id,
        backend_name=row.name,
        version_configs=row.versions,
        default_version=row.default_version,
        default_backend_param=row.default_backend_param,
        default_run_command=row.default_run_command,
        default_entrypoint=row.default_entrypoint,
        is_built_in=row.builtin,
        description=row.description,
        health_check_path=row.health_check_path,
        default_env=row.default_env,
        backend_source="built_in" if row.builtin else "custom",
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def store(row: InferenceBackend, body: S.BackendCreate) -> None:
    """Copy a validated body onto a row (create and replace)."""
    row.name, row.description = body.backend_name, body.description
    row.default_version = body.default_version
    row.versions = {k: v.model_dump(exclude_none=True) for k, v in body.version_configs.items()}
    row.default_backend_param = body.default_backend_param
    row.default_run_command, row.default_entrypoint = (
        body.default_run_command,
        body.default_entrypoint,
    )
    row.default_env, row.health_check_path = body.default_env, body.health_check_path


def from_yaml(payload: dict[str, Any]) -> S.BackendCreate:
    """GPUStack's `{"content": "<yaml>"}` body -> a validated backend."""
    content = payload.get("content")
    if not isinstance(content, str) or not content.strip():
        raise ApiError(400, "missing 'content' (the backend definition as YAML)", "invalid_yaml")
    try:
        data = yaml.safe_load(content)
    except yaml.YAMLError as e:
        raise ApiError(400, f"invalid YAML: {e}", "invalid_yaml") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the YAML must be a mapping with backend_name", "invalid_yaml")
    try:
        return S.BackendCreate.model_validate(data)
    except pydantic.ValidationError as e:
        raise invalid_body(e) from None


def _editable(s: Session, ref: str) -> InferenceBackend:
    row = get_or_404(s, InferenceBackend, ref, "backend")
    if row.builtin:
        raise ApiError(400, "the built-in backend cannot be changed", "builtin")
    return row


def router(state: ClusterState) -> APIRouter:
    r = APIRouter(prefix="/v2/inference-backends", dependencies=admin(state))

    def create(body: S.BackendCreate) -> S.BackendOut:
        with state.sessions.begin() as s:
            ensure_unique(s, InferenceBackend, body.backend_name, "inference backend")
            row = InferenceBackend(builtin=False)
            store(row, body)
            s.add(row)
            s.flush()
            return backend_out(row)

    def replace(ref: str, body: S.BackendCreate) -> S.BackendOut:
        with state.sessions.begin() as s:
            row = _editable(s, ref)
            if body.backend_name != row.name:
                ensure_unique(s, InferenceBackend, body.backend_name, "inference backend")
            store(row, body)
            s.flush()
            return backend_out(row)

    @r.get("")
    def list_backends(page: int = 1, perPage: int = 100) -> S.Page[S.BackendOut]:  # noqa: N803
        with state.sessions() as s:
            rows = s.scalars(sa.select(InferenceBackend).order_by(InferenceBackend.id)).all()
            return S.paginate([backend_out(b) for b in rows], page, perPage)

    @r.post("", status_code=201)
    def create_backend(body: S.BackendCreate) -> S.BackendOut:
        return create(body)

    @r.post("/from-yaml", status_code=201)
    def create_backend_from_yaml(payload: dict = Body(...)) -> S.BackendOut:
        return create(from_yaml(payload))

    @r.get("/{ref}")
    def get_backend(ref: str) -> S.BackendOut:
        with state.sessions() as s:
            return backend_out(get_or_404(s, InferenceBackend, ref, "backend"))

    @r.put("/{ref}")
    def update_backend(ref: str, body: S.BackendCreate) -> S.BackendOut:
        return replace(ref, body)

    @r.put("/{ref}/from-yaml")
    def update_backend_from_yaml(ref: str, payload: dict = Body(...)) -> S.BackendOut:
        return replace(ref, from_yaml(payload))

    @r.delete("/{ref}", status_code=204)
    def delete_backend(ref: str) -> None:
        with state.sessions.begin() as s:
            row = get_or_404(s, InferenceBackend, ref, "backend")
            if row.builtin:
                raise ApiError(400, "the built-in backend cannot be deleted", "builtin")
            users = s.scalars(sa.select(Model.name).where(Model.backend == row.name)).all()
            if users:
                raise ApiError(409, f"backend {row.name!r} is used by {', '.join(users)}", "in_use")
            s.delete(row)

    return r
