"""App-wide ASGI middleware: a request id on every request, and the `--api-key` check.

Being middleware, the key covers every route, including ones added later in other routers, the
OpenAPI schema and /docs; only /health stays open (load balancers probe it without a key).
"""

from __future__ import annotations

import hmac
import json
import re
import uuid

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specserve.server.protocol import error_body

OPEN_PATHS = frozenset({"/health"})
_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def request_id(scope: Scope) -> str:
    """The id the middleware gave this request (also sent back as `X-Request-Id`)."""
    return scope.get("state", {}).get("request_id", "")


class RequestGuard:
    def __init__(self, app: ASGIApp, api_key: str | None = None) -> None:
        self.app = app
        self.key = None if api_key is None else api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rid = headers.get("x-request-id", "")
        if not _ID.fullmatch(rid):  # the client's id only if it is safe to log and echo
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        if self.key is not None and scope["path"] not in OPEN_PATHS:
            if not self.authorized(headers.get("authorization", "")):
                await _unauthorized(send_with_id)
                return
        await self.app(scope, receive, send_with_id)

    def authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        # compare_digest takes the same time wherever the first difference is
        return (
            scheme.lower() == "bearer"
            and self.key is not None
            and hmac.compare_digest(token.strip().encode(), self.key)
        )


async def _unauthorized(send: Send) -> None:
    body = error_body(
        "invalid or missing API key: send 'Authorization: Bearer <key>'",
        type_="authentication_error",
        code="invalid_api_key",
    )
    raw = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(raw)).encode()),
        (b"www-authenticate", b"Bearer"),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": raw})
