"""`/v2/inference-backends`: how to launch each backend version (command templates)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from fastapi import APIRouter

from specserve.cluster import schemas as S
from specserve.cluster.auth import ApiError
from specserve.cluster.db import InferenceBackend, Model
from specserve.cluster.routes.common import admin, ensure_unique, get_or_404

if TYPE_CHECKING:
    from specserve.cluster.server import ClusterState


def router(state: ClusterState) -> APIRouter:
    r = APIRouter(prefix="/v2/inference-backends", dependencies=admin(state))

    @r.get("")
    def list_backends() -> list[S.BackendOut]:
        with state.sessions() as s:
            rows = s.scalars(sa.select(InferenceBackend).order_by(InferenceBackend.id))
            return [S.BackendOut.model_validate(b) for b in rows]

    @r.post("", status_code=201)
    def create_backend(body: S.BackendCreate) -> S.BackendOut:
        with state.sessions.begin() as s:
            ensure_unique(s, InferenceBackend, body.name, "inference backend")
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

    @r.get("/{ref}")
    def get_backend(ref: str) -> S.BackendOut:
        with state.sessions() as s:
            return S.BackendOut.model_validate(get_or_404(s, InferenceBackend, ref, "backend"))

    @r.patch("/{ref}")
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
