"""OpenAI-compatible gateway: `/v1/...` requests routed by model name to running instances.

Round-robin over the deployment's running instances; a request that cannot connect
moves on to the next instance. The body, its `model` included, is forwarded unchanged, so
an instance must answer to the deployment name (`--served-model-name {{model_name}}` in
the backend's template). Responses (streaming included) are relayed byte for byte.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import httpx
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from specserve.cluster.auth import ApiError
from specserve.cluster.db import Model, ModelInstance

if TYPE_CHECKING:
    from specserve.cluster.server import ClusterState


def reason(e: httpx.HTTPError) -> str:
    """Why a call to an instance failed: httpx's message (sometimes empty or generic, e.g.
    "All connection attempts failed") and the innermost OS error under it, if any."""
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    os_error, cause = None, e.__cause__ or e.__context__
    while cause is not None:
        os_error = cause if isinstance(cause, OSError) else os_error
        cause = cause.__cause__ or cause.__context__
    if os_error is None:
        return text
    return f"{text} ({type(os_error).__name__}: {os_error.strerror or os_error})"


def gateway_router(state: ClusterState) -> APIRouter:
    counters: dict[str, itertools.count] = defaultdict(itertools.count)

    def inference(request: Request) -> None:
        state.auth.require(request, "inference")

    r = APIRouter(dependencies=[Depends(inference)])

    @r.get("/v1/models")
    def models() -> dict:
        return _model_list(state)

    @r.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        return await _proxy(state, counters, request, "/v1/completions")

    @r.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> StreamingResponse:
        return await _proxy(state, counters, request, "/v1/chat/completions")

    return r


def _running(state: ClusterState, model: str) -> list[ModelInstance]:
    with state.sessions() as s:
        return list(
            s.scalars(
                sa.select(ModelInstance)
                .where(ModelInstance.model_name == model, ModelInstance.state == "running")
                .order_by(ModelInstance.id)
            )
        )


def _model_list(state: ClusterState) -> dict:
    """`/v1/models`: the deployments with at least one running instance."""
    with state.sessions() as s:
        names = s.scalars(sa.select(Model.name).order_by(Model.id)).all()
        created = {m.name: int(m.created_at.timestamp()) for m in s.scalars(sa.select(Model))}
    live = [n for n in names if _running(state, n)]
    return {
        "object": "list",
        "data": [
            {
                "id": n,
                "object": "model",
                "created": created.get(n, int(time.time())),
                "owned_by": "specserve",
            }
            for n in live
        ],
    }


def _requested_model(body: bytes) -> str:
    """The body's `model`, or 400."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        raise ApiError(400, "request body must be a JSON object", "invalid_json") from None
    if not isinstance(model, str) or not model:
        raise ApiError(400, "missing 'model'", "missing_model")
    return model


def _serving(state: ClusterState, model: str) -> list[ModelInstance]:
    """The running instances of `model`; 404 for an unknown model, 503 when none runs."""
    instances = _running(state, model)
    if not instances:
        with state.sessions() as s:
            exists = s.scalar(sa.select(Model.id).where(Model.name == model)) is not None
        if not exists:
            raise ApiError(404, f"model {model!r} does not exist", "model_not_found")
        raise ApiError(503, f"model {model!r} has no running instance", "model_unavailable")
    return instances


async def _proxy(
    state: ClusterState, counters: dict[str, itertools.count], request: Request, path: str
) -> StreamingResponse:
    """Forward the request to the model's next instance in turn, moving on past instances
    that refuse the connection."""
    body = await request.body()
    model = _requested_model(body)
    instances = _serving(state, model)
    start = next(counters[model])
    last_error = ""
    for k in range(len(instances)):
        inst = instances[(start + k) % len(instances)]
        req = state.http.build_request(
            "POST",
            f"http://{inst.worker_ip}:{inst.port}{path}",
            content=body,
            headers={"content-type": "application/json"},
        )
        try:
            resp = await state.http.send(req, stream=True)
        except httpx.ConnectError as e:
            last_error = f"{inst.name} at {inst.worker_ip}:{inst.port}: {reason(e)}"
            continue
        except httpx.HTTPError as e:
            raise ApiError(
                502, f"instance {inst.name} failed: {reason(e)}", "upstream_error"
            ) from e
        return StreamingResponse(
            resp.aiter_raw(),
            status_code=resp.status_code,
            media_type=resp.headers.get("content-type", "application/json"),
            background=BackgroundTask(resp.aclose),
        )
    raise ApiError(502, f"no instance of {model!r} reachable ({last_error})", "upstream_error")
