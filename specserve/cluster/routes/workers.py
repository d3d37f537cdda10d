"""`/v2/workers`: registration, heartbeats (answered with assignments), instance state
pushes (worker credential), and the admin's list and delete."""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import TYPE_CHECKING

import sqlalchemy as sa
from fastapi import APIRouter, Request
from sqlalchemy.orm import Session

from specserve.cluster import schemas as S
from specserve.cluster.auth import ApiError, bearer, hash_secret
from specserve.cluster.db import Model, ModelInstance, Worker, utcnow
from specserve.cluster.routes.common import admin, get_or_404, wake
from specserve.cluster.routes.instances import instance_out
from specserve.cluster.routes.models import model_out
from specserve.cluster.scheduler import launch_template, reset_instance

if TYPE_CHECKING:
    from specserve.cluster.server import ClusterState

log = logging.getLogger("specserve.cluster.server")


def worker_out(w: Worker) -> S.WorkerOut:
    return S.WorkerOut(
        id=w.id,
        name=w.name,
        hostname=w.name,
        ip=w.ip,
        port=w.port,
        labels=w.labels,
        state=w.state,
        state_message=w.state_message,
        status=S.WorkerStatus.model_validate(w.status or {}).gpustack(),
        heartbeat_time=w.heartbeat_at,
        port_range_start=w.port_range_start,
        port_range_end=w.port_range_end,
        created_at=w.created_at,
        updated_at=w.heartbeat_at,
    )


def router(state: ClusterState) -> APIRouter:
    r = APIRouter(prefix="/v2/workers")
    _admin_routes(r, state)
    _worker_routes(r, state)
    return r


def _worker_auth(state: ClusterState, request: Request, worker_id: int) -> Worker:
    """The worker whose credential the request carries, or 401."""
    with state.sessions() as s:
        w = s.get(Worker, worker_id)
    cred = bearer(request) or ""
    if w is None or not hmac.compare_digest(w.credential_hash, hash_secret(cred)):
        raise ApiError(401, "invalid worker credential", "invalid_credential")
    return w


def _assignments(s: Session, w: Worker) -> list[S.Assignment]:
    """The instances placed on `w` whose model still launches."""
    out = []
    for inst in s.scalars(sa.select(ModelInstance).where(ModelInstance.worker_id == w.id)):
        m = s.get(Model, inst.model_id)
        launch = launch_template(s, m) if m else "model deleted"
        if isinstance(launch, S.LaunchTemplate):
            out.append(
                S.Assignment(instance=instance_out(inst, m), model=model_out(s, m), launch=launch)
            )
    return out


def _admin_routes(r: APIRouter, state: ClusterState) -> None:
    """The admin's list, get and delete."""
    A = admin(state)

    @r.get("", dependencies=A)
    def list_workers(page: int = 1, perPage: int = 100) -> S.Page[S.WorkerOut]:  # noqa: N803
        with state.sessions() as s:
            rows = s.scalars(sa.select(Worker).order_by(Worker.id)).all()
            return S.paginate([worker_out(w) for w in rows], page, perPage)

    @r.get("/{ref}", dependencies=A)
    def get_worker(ref: str) -> S.WorkerOut:
        with state.sessions() as s:
            return worker_out(get_or_404(s, Worker, ref, "worker"))

    @r.delete("/{ref}", dependencies=A, status_code=204)
    def delete_worker(ref: str) -> None:
        with state.sessions.begin() as s:
            w = get_or_404(s, Worker, ref, "worker")
            for inst in s.scalars(sa.select(ModelInstance).where(ModelInstance.worker_id == w.id)):
                reset_instance(inst, f"worker {w.name} was removed; rescheduling")
            s.delete(w)
        wake(state)


def _worker_routes(r: APIRouter, state: ClusterState) -> None:
    """What workers call: registration (cluster token), heartbeats and instance state pushes
    (the worker's own credential)."""

    @r.post("/register")
    def register(body: S.WorkerRegister, request: Request) -> S.WorkerRegistered:
        if not hmac.compare_digest((bearer(request) or "").encode(), state.token.encode()):
            raise ApiError(401, "invalid registration token", "invalid_token")
        credential = secrets.token_urlsafe(32)
        with state.sessions.begin() as s:
            w = s.scalar(sa.select(Worker).where(Worker.name == body.name))
            if w is None:
                w = Worker(name=body.name)
                s.add(w)
            for key, value in body.model_dump().items():
                setattr(w, key, value)
            w.credential_hash = hash_secret(credential)
            w.state, w.state_message, w.heartbeat_at = "ready", "", utcnow()
            s.flush()
            out = S.WorkerRegistered(**worker_out(w).model_dump(), credential=credential)
        log.info("worker %s registered from %s", body.name, body.ip)
        wake(state)
        return out

    @r.post("/{worker_id}/heartbeat")
    def heartbeat(worker_id: int, body: S.WorkerStatus, request: Request) -> list[S.Assignment]:
        """Record status; answer with the instances this worker must run."""
        _worker_auth(state, request, worker_id)
        with state.sessions.begin() as s:
            w = s.get(Worker, worker_id)
            w.status, w.heartbeat_at = body.model_dump(), utcnow()
            if w.state != "ready":
                w.state, w.state_message = "ready", ""
            out = _assignments(s, w)
        return out

    @r.put("/{worker_id}/instances/{instance_id}/state")
    def push_state(
        worker_id: int, instance_id: int, body: S.InstanceStateUpdate, request: Request
    ) -> dict:
        w = _worker_auth(state, request, worker_id)
        if body.state in ("pending", "scheduled"):
            raise ApiError(400, f"workers may not set state {body.state!r}")
        with state.sessions.begin() as s:
            inst = s.get(ModelInstance, instance_id)
            if inst is None or inst.worker_id != w.id:
                raise ApiError(
                    409, f"instance {instance_id} is not assigned to {w.name}", "not_assigned"
                )
            inst.state, inst.state_message = body.state, body.state_message
            if body.pid is not None:
                inst.pid = body.pid
            if body.restart_count is not None:
                inst.restart_count = body.restart_count
        return {}
