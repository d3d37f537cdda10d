"""What the resource routers share: the admin dependency, lookups, the controller wake-up."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import pydantic
import sqlalchemy as sa
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from specserve.cluster.auth import ApiError

if TYPE_CHECKING:
    from specserve.cluster.server import ClusterState

T = TypeVar("T")


def admin(state: ClusterState) -> list:
    """Route dependencies that require the admin (session, password or management key)."""

    def require(request: Request) -> None:
        state.auth.require(request, "management")

    return [Depends(require)]


def wake(state: ClusterState) -> None:
    """Run the controller now instead of at its next interval."""
    if state.controller is not None:
        state.controller.wake.set()


def get_or_404(s: Session, table: type[T], ref: str, what: str) -> T:
    """Look a row up by numeric id or by name."""
    column = table.id if ref.isdigit() else table.name  # type: ignore[attr-defined]
    row = s.scalar(sa.select(table).where(column == (int(ref) if ref.isdigit() else ref)))
    if row is None:
        raise ApiError(404, f"{what} {ref!r} not found", "not_found")
    return row


def ensure_unique(s: Session, table: type, name: str, what: str) -> None:
    if s.scalar(sa.select(table.id).where(table.name == name)) is not None:
        raise ApiError(409, f"{what} {name!r} already exists", "conflict")


def validation_message(errors: list[dict]) -> str:
    """Pydantic errors as one line: `field.path: message; ...`."""
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err["loc"] if x != "body")
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def invalid_body(e: pydantic.ValidationError) -> ApiError:
    return ApiError(400, validation_message(e.errors()), "invalid_request")
