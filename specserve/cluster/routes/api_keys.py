"""`/v2/api-keys`: keys for the gateway (inference) and the API (management)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import sqlalchemy as sa
from fastapi import APIRouter

from specserve.cluster import schemas as S
from specserve.cluster.auth import new_api_key
from specserve.cluster.db import ApiKey, utcnow
from specserve.cluster.routes.common import admin, ensure_unique, get_or_404

if TYPE_CHECKING:
    from specserve.cluster.server import ClusterState


def router(state: ClusterState) -> APIRouter:
    r = APIRouter(prefix="/v2/api-keys", dependencies=admin(state))

    @r.get("")
    def list_keys() -> list[S.ApiKeyOut]:
        with state.sessions() as s:
            rows = s.scalars(sa.select(ApiKey).order_by(ApiKey.id))
            return [S.ApiKeyOut.model_validate(k) for k in rows]

    @r.post("", status_code=201)
    def create_key(body: S.ApiKeyCreate) -> S.ApiKeyCreated:
        value, access, secret_hash = new_api_key()
        days = body.expires_in_days
        expires = utcnow() + dt.timedelta(days=days) if days else None
        with state.sessions.begin() as s:
            ensure_unique(s, ApiKey, body.name, "API key")
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

    @r.delete("/{ref}", status_code=204)
    def delete_key(ref: str) -> None:
        with state.sessions.begin() as s:
            s.delete(get_or_404(s, ApiKey, ref, "API key"))

    return r
