"""The `/v2` management API, one router per resource; `routers(state)` lists them all."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter

from specserve.cluster.routes import api_keys, auth, backends, instances, models, workers

if TYPE_CHECKING:
    from specserve.cluster.server import ClusterState


def routers(state: ClusterState) -> list[APIRouter]:
    return [m.router(state) for m in (auth, backends, models, instances, workers, api_keys)]
