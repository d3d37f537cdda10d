"""Serving until told to stop: uvicorn with a graceful drain on SIGTERM / SIGINT, and a non-zero
exit when the engine loop dies (so a supervisor restarts the process)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from specserve.server.api import drain
from specserve.server.async_engine import AsyncEngine

log = logging.getLogger("specserve.server")

# uvicorn's own deadline for open connections, after the drain has aborted what was left
_CLOSE_GRACE_S = 5.0


class GracefulServer(uvicorn.Server):
    """The first signal starts `api.drain` (refuse new requests, let open ones finish for
    `shutdown_timeout` seconds, then abort them with a final error event) while uvicorn stops
    accepting connections; a second SIGINT forces the exit."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.app, self.shutdown_timeout = app, shutdown_timeout
        self.engine_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # handled by the drain: return, so the caller cleans up, instead of re-raising
            self._captured_signals.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._draining and self._loop is not None:
            self._draining = True
            self._loop.call_soon_threadsafe(self._start_drain)
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        # kept on self: the event loop holds only a weak reference to a task
        self._drain = asyncio.ensure_future(drain(self.app, self.shutdown_timeout))

    def engine_died(self, reason: str) -> None:
        """Called on the engine thread when its loop dies."""
        self.engine_error = reason
        self.should_exit = True


def serve(
    engine: AsyncEngine,
    app: FastAPI,
    host: str,
    port: int,
    log_level: str = "info",
    shutdown_timeout: float = 30.0,
) -> int:
    """Start the engine loop, serve until a signal or the engine's death; 1 if it died."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(shutdown_timeout + _CLOSE_GRACE_S),
    )
    server = GracefulServer(config, app, shutdown_timeout)
    engine.on_death = server.engine_died
    engine.start()
    try:
        server.run()
    finally:
        engine.shutdown()
    if server.engine_error is not None:
        log.error("exiting: the engine loop died (%s)", server.engine_error)
        return 1
    return 0
