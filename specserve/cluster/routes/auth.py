"""`/auth`: UI login (session cookie), logout, who am I."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response

from specserve.cluster import schemas as S
from specserve.cluster.auth import SESSION_COOKIE, ApiError
from specserve.cluster.routes.common import admin

if TYPE_CHECKING:
    from specserve.cluster.server import ClusterState


def router(state: ClusterState) -> APIRouter:
    r = APIRouter()

    @r.post("/auth/login")
    def login(body: S.Login, response: Response) -> dict:
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
