"""`/v2/models`: deployments (what to serve, with which backend, how many replicas), in
GPUStack's shape; PUT replaces by id, PATCH (a specserve extension) changes some fields."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from fastapi import APIRouter
from sqlalchemy.orm import Session

from specserve.cluster import schemas as S
from specserve.cluster.auth import ApiError
from specserve.cluster.db import InferenceBackend, Model, ModelInstance
from specserve.cluster.routes.common import admin, ensure_unique, get_or_404, wake

if TYPE_CHECKING:
    from specserve.cluster.server import ClusterState

IMMUTABLE = ("name", "source", "local_path", "huggingface_repo_id", "model_scope_model_id",
             "backend")  # fmt: skip


def model_out(s: Session, m: Model) -> S.ModelOut:
    ready = s.scalar(
        sa.select(sa.func.count()).where(
            ModelInstance.model_id == m.id, ModelInstance.state == "running"
        )
    )
    hub = {"huggingface": "huggingface_repo_id", "model_scope": "model_scope_model_id"}
    return S.ModelOut(
        id=m.id,
        name=m.name,
        description=m.description,
        source=m.source,
        local_path=m.local_path,
        huggingface_repo_id=m.repo_id if hub.get(m.source) == "huggingface_repo_id" else None,
        model_scope_model_id=m.repo_id if hub.get(m.source) == "model_scope_model_id" else None,
        replicas=m.replicas,
        ready_replicas=ready or 0,
        categories=m.categories,
        placement_strategy=m.placement,
        worker_selector=m.worker_selector,
        backend=m.backend,
        backend_version=m.backend_version,
        backend_parameters=m.backend_parameters,
        env=m.env,
        created_at=m.created_at,
        updated_at=m.updated_at,
    )


def check_backend(s: Session, backend: str, version: str | None) -> None:
    row = s.scalar(sa.select(InferenceBackend).where(InferenceBackend.name == backend))
    if row is None:
        raise ApiError(400, f"inference backend {backend!r} does not exist", "invalid_backend")
    if version is not None and version not in row.versions:
        raise ApiError(
            400,
            f"backend {backend!r} has no version {version!r} (has: {', '.join(row.versions)})",
            "invalid_backend",
        )


def apply(m: Model, changes: dict) -> None:
    """Set API fields on the row (names differ where specserve's columns predate GPUStack's)."""
    columns = {"placement_strategy": "placement"}
    for key, value in changes.items():
        setattr(m, columns.get(key, key), value)


def router(state: ClusterState) -> APIRouter:
    r = APIRouter(prefix="/v2/models", dependencies=admin(state))

    def update(ref: str, changes: dict) -> S.ModelOut:
        with state.sessions.begin() as s:
            m = get_or_404(s, Model, ref, "model")
            if "backend_version" in changes:
                check_backend(s, m.backend, changes["backend_version"])
            apply(m, changes)
            s.flush()
            out = model_out(s, m)
        wake(state)
        return out

    @r.get("")
    def list_models(page: int = 1, perPage: int = 100) -> S.Page[S.ModelOut]:  # noqa: N803
        with state.sessions() as s:
            rows = s.scalars(sa.select(Model).order_by(Model.id)).all()
            return S.paginate([model_out(s, m) for m in rows], page, perPage)

    @r.post("", status_code=201)
    def create_model(body: S.ModelCreate) -> S.ModelOut:
        with state.sessions.begin() as s:
            ensure_unique(s, Model, body.name, "model")
            check_backend(s, body.backend, body.backend_version)
            fields = body.model_dump(include=set(S.ModelUpdate.model_fields) | {"replicas"})
            m = Model(name=body.name, source=body.source, local_path=body.local_path,
                      repo_id=body.repo_id, backend=body.backend)  # fmt: skip
            apply(m, fields)
            s.add(m)
            s.flush()
            out = model_out(s, m)
        wake(state)
        return out

    @r.get("/{ref}")
    def get_model(ref: str) -> S.ModelOut:
        with state.sessions() as s:
            return model_out(s, get_or_404(s, Model, ref, "model"))

    @r.put("/{ref}")
    def replace_model(ref: str, body: S.ModelCreate) -> S.ModelOut:
        """GPUStack's update: the whole object; what cannot change in place must not differ."""
        with state.sessions() as s:
            current = model_out(s, get_or_404(s, Model, ref, "model")).model_dump()
        new = body.model_dump()
        changed = [k for k in IMMUTABLE if new[k] != current[k]]
        if changed:
            raise ApiError(
                400, f"cannot change {', '.join(changed)} of a deployment; create a new one"
            )
        return update(ref, body.model_dump(include=set(S.ModelUpdate.model_fields)))

    @r.patch("/{ref}")
    def update_model(ref: str, body: S.ModelUpdate) -> S.ModelOut:
        return update(ref, body.model_dump(exclude_unset=True))

    @r.delete("/{ref}", status_code=204)
    def delete_model(ref: str) -> None:
        with state.sessions.begin() as s:
            m = get_or_404(s, Model, ref, "model")
            s.execute(sa.delete(ModelInstance).where(ModelInstance.model_id == m.id))
            s.delete(m)

    return r
