"""`/v2/models`: deployments (what to serve, with which backend, how many replicas)."""

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


def model_out(s: Session, m: Model) -> S.ModelOut:
    ready = s.scalar(
        sa.select(sa.func.count()).where(
            ModelInstance.model_id == m.id, ModelInstance.state == "running"
        )
    )
    return S.ModelOut.model_validate(m).model_copy(update={"ready_replicas": ready or 0})


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


def router(state: ClusterState) -> APIRouter:
    r = APIRouter(prefix="/v2/models", dependencies=admin(state))

    @r.get("")
    def list_models() -> list[S.ModelOut]:
        with state.sessions() as s:
            return [model_out(s, m) for m in s.scalars(sa.select(Model).order_by(Model.id))]

    @r.post("", status_code=201)
    def create_model(body: S.ModelCreate) -> S.ModelOut:
        with state.sessions.begin() as s:
            ensure_unique(s, Model, body.name, "model")
            check_backend(s, body.backend, body.backend_version)
            m = Model(**body.model_dump())
            s.add(m)
            s.flush()
            out = model_out(s, m)
        wake(state)
        return out

    @r.get("/{ref}")
    def get_model(ref: str) -> S.ModelOut:
        with state.sessions() as s:
            return model_out(s, get_or_404(s, Model, ref, "model"))

    @r.patch("/{ref}")
    def update_model(ref: str, body: S.ModelUpdate) -> S.ModelOut:
        with state.sessions.begin() as s:
            m = get_or_404(s, Model, ref, "model")
            changes = body.model_dump(exclude_unset=True)
            if "backend_version" in changes:
                check_backend(s, m.backend, changes["backend_version"])
            for p in changes.get("backend_parameters") or []:
                try:
                    S.check_template(p, "backend_parameters")
                except ValueError as e:
                    raise ApiError(400, str(e), "invalid_template") from e
            for key, value in changes.items():
                setattr(m, key, value)
            s.flush()
            out = model_out(s, m)
        wake(state)
        return out

    @r.delete("/{ref}", status_code=204)
    def delete_model(ref: str) -> None:
        with state.sessions.begin() as s:
            m = get_or_404(s, Model, ref, "model")
            s.execute(sa.delete(ModelInstance).where(ModelInstance.model_id == m.id))
            s.delete(m)

    return r
