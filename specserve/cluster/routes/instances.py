"""`/v2/model-instances`: the replicas of deployments, their logs, restart by delete."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from specserve.cluster import schemas as S
from specserve.cluster.auth import ApiError
from specserve.cluster.db import Model, ModelInstance, Worker
from specserve.cluster.routes.common import admin, get_or_404, wake

if TYPE_CHECKING:
    from specserve.cluster.server import ClusterState


def instance_out(inst: ModelInstance, m: Model | None) -> S.InstanceOut:
    """GPUStack's ModelInstancePublic: the instance plus its deployment's source and backend."""
    hub = m.repo_id if m is not None else None
    vram = inst.computed_resource.get("vram", 0)
    per_gpu = {g: vram // len(inst.gpu_ids) for g in inst.gpu_ids} if inst.gpu_ids else None
    return S.InstanceOut(
        id=inst.id,
        name=inst.name,
        model_id=inst.model_id,
        model_name=inst.model_name,
        source=m.source if m is not None else "local_path",
        local_path=m.local_path if m is not None else None,
        huggingface_repo_id=hub if m is not None and m.source == "huggingface" else None,
        model_scope_model_id=hub if m is not None and m.source == "model_scope" else None,
        backend=m.backend if m is not None else None,
        backend_version=m.backend_version if m is not None else None,
        worker_id=inst.worker_id,
        worker_name=inst.worker_name,
        worker_ip=inst.worker_ip,
        port=inst.port,
        ports=[inst.port] if inst.port else [],
        gpu_indexes=inst.gpu_ids,
        computed_resource_claim=S.ComputedResourceClaim(
            ram=inst.computed_resource.get("ram"), vram=per_gpu
        )
        if inst.computed_resource
        else None,
        state=inst.state,
        state_message=inst.state_message,
        pid=inst.pid,
        restart_count=inst.restart_count,
        created_at=inst.created_at,
        updated_at=inst.updated_at,
    )


def instances_out(s: Session, rows: list[ModelInstance]) -> list[S.InstanceOut]:
    models = {m.id: m for m in s.scalars(sa.select(Model))}
    return [instance_out(i, models.get(i.model_id)) for i in rows]


def router(state: ClusterState) -> APIRouter:
    r = APIRouter(prefix="/v2/model-instances", dependencies=admin(state))

    @r.get("")
    def list_instances(
        model: str | None = None,
        worker: str | None = None,
        model_id: int | None = None,
        worker_id: int | None = None,
        page: int = 1,
        perPage: int = 100,  # noqa: N803 - GPUStack's name
    ) -> S.Page[S.InstanceOut]:
        """Filters: `model_id`, `worker_id` (GPUStack's) or names (specserve's)."""
        q = sa.select(ModelInstance).order_by(ModelInstance.id)
        for column, value in [(ModelInstance.model_name, model), (ModelInstance.worker_name,
                              worker), (ModelInstance.model_id, model_id),
                              (ModelInstance.worker_id, worker_id)]:  # fmt: skip
            if value is not None:
                q = q.where(column == value)
        with state.sessions() as s:
            return S.paginate(instances_out(s, list(s.scalars(q))), page, perPage)

    @r.get("/{ref}")
    def get_instance(ref: str) -> S.InstanceOut:
        with state.sessions() as s:
            inst = get_or_404(s, ModelInstance, ref, "instance")
            return instance_out(inst, s.get(Model, inst.model_id))

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
