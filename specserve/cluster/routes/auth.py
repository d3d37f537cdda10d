"""`/auth`: UI login (session cookie), logout, who am I."""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING

import pydantic
from fastapi import APIRouter, Request, Response

from specserve.cluster import schemas as S
from specserve.cluster.auth import SESSION_COOKIE, ApiError
from specserve.cluster.routes.common import admin

if TYPE_CHECKING:
    from specserve.cluster.server import ClusterState


async def credentials(request: Request) -> S.Login:
    raw = await request.body()
    try:
        if request.headers.get("content-type", "").startswith("application/json"):
            return S.Login.model_validate_json(raw)
        form = urllib.parse.parse_qs(raw.decode(), keep_blank_values=True)
        return S.Login(**{k: form.get(k, [""])[0] for k in ("username", "password")})
    except (pydantic.ValidationError, UnicodeDecodeError):
        raise ApiError(400, "send username and password as form fields or JSON") from None


def router(state: ClusterState) -> APIRouter:
    r = APIRouter()

    @r.post("/auth/login")
    async def login(request: Request, response: Response) -> dict:
        """Form fields `username`, `password` (GPUStack's login) or the same as JSON."""
        body = await credentials(request)
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

    @r.get("/auth/me", dependencies=admin(state))
    def me() -> dict:
        return {"username": "admin"}

    return r
