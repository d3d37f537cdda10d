"""`/v2/model-instances`: the replicas of deployments, their logs, restart by delete."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from specserve.cluster import schemas as S
from specserve.cluster.auth import ApiError
from specserve.cluster.db import ModelInstance, Worker
from specserve.cluster.routes.common import admin, get_or_404, wake

if TYPE_CHECKING:
    from specserve.cluster.server import ClusterState


def router(state: ClusterState) -> APIRouter:
    r = APIRouter(prefix="/v2/model-instances", dependencies=admin(state))

    @r.get("")
    def list_instances(model: str | None = None, worker: str | None = None) -> list[S.InstanceOut]:
        q = sa.select(ModelInstance).order_by(ModelInstance.id)
        if model:
            q = q.where(ModelInstance.model_name == model)
        if worker:
            q = q.where(ModelInstance.worker_name == worker)
        with state.sessions() as s:
            return [S.InstanceOut.model_validate(i) for i in s.scalars(q)]

    @r.get("/{ref}")
    def get_instance(ref: str) -> S.InstanceOut:
        with state.sessions() as s:
            return S.InstanceOut.model_validate(get_or_404(s, ModelInstance, ref, "instance"))

    @r.delete("/{ref}", status_code=204)
    def delete_instance(ref: str) -> None:
        """Deleting an instance restarts it: the replica count brings a new one."""
        with state.sessions.begin() as s:
            s.delete(get_or_404(s, ModelInstance, ref, "instance"))
        wake(state)

    @r.get("/{ref}/logs")
    async def instance_logs(ref: str, follow: bool = False, tail: int = 0) -> StreamingResponse:
        with state.sessions() as s:
            inst = get_or_404(s, ModelInstance, ref, "instance")
            w = s.get(Worker, inst.worker_id) if inst.worker_id else None
        if w is None:
            raise ApiError(409, f"instance {inst.name} is not on a worker ({inst.state})")
        req = state.http.build_request(
            "GET",
            f"http://{w.ip}:{w.port}/v1/instances/{inst.id}/logs",
            params={"follow": str(follow).lower(), "tail": tail},
            headers={"Authorization": f"Bearer {state.token}"},
        )
        try:
            resp = await state.http.send(req, stream=True)
        except httpx.HTTPError as e:
            raise ApiError(502, f"worker {w.name} unreachable: {e}", "worker_unreachable") from e
        if resp.status_code != 200:
            await resp.aread()
            await resp.aclose()
            raise ApiError(resp.status_code, f"worker {w.name}: {resp.text[:300]}")
        return StreamingResponse(
            resp.aiter_raw(),
            media_type="text/plain; charset=utf-8",
            background=BackgroundTask(resp.aclose),
        )

    return r
