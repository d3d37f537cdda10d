"""`/v2/api-keys`: keys for the gateway (inference) and the API (management)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import sqlalchemy as sa
from fastapi import APIRouter

from specserve.cluster import schemas as S
from specserve.cluster.auth import KEY_PREFIX, new_api_key
from specserve.cluster.db import ApiKey, utcnow
from specserve.cluster.routes.common import admin, ensure_unique, get_or_404

if TYPE_CHECKING:
    from specserve.cluster.server import ClusterState


def key_out(row: ApiKey, value: str | None = None) -> S.ApiKeyOut:
    return S.ApiKeyOut(
        id=row.id,
        name=row.name,
        description=row.description,
        access_key=row.access_key,
        masked_value=f"{KEY_PREFIX}_{row.access_key}_***",
        scope=row.scopes,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        created_at=row.created_at,
        updated_at=row.created_at,
        value=value,
    )


def router(state: ClusterState) -> APIRouter:
    r = APIRouter(prefix="/v2/api-keys", dependencies=admin(state))

    @r.get("")
    def list_keys(page: int = 1, perPage: int = 100) -> S.Page[S.ApiKeyOut]:  # noqa: N803
        with state.sessions() as s:
            rows = s.scalars(sa.select(ApiKey).order_by(ApiKey.id)).all()
            return S.paginate([key_out(k) for k in rows], page, perPage)

    @r.post("", status_code=201)
    def create_key(body: S.ApiKeyCreate) -> S.ApiKeyOut:
        value, access, secret_hash = new_api_key()
        seconds = body.expires_in
        expires = utcnow() + dt.timedelta(seconds=seconds) if seconds else None
        with state.sessions.begin() as s:
            ensure_unique(s, ApiKey, body.name, "API key")
            row = ApiKey(
                name=body.name,
                description=body.description,
                access_key=access,
                secret_hash=secret_hash,
                scopes=sorted(set(body.scope)),
                expires_at=expires,
            )
            s.add(row)
            s.flush()
            return key_out(row, value)

    @r.delete("/{ref}", status_code=204)
    def delete_key(ref: str) -> None:
        with state.sessions.begin() as s:
            s.delete(get_or_404(s, ApiKey, ref, "API key"))

    return r
