"""Running the cluster's HTTP apps and background loops in one process until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Generator

import uvicorn
from fastapi import FastAPI


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to `serve_until_signal`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def http_server(app: FastAPI, host: str, port: int) -> uvicorn.Server:
    return _Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    )


async def serve_until_signal(servers: list[uvicorn.Server], loops: list[Awaitable[None]]) -> None:
    """Serve until SIGINT/SIGTERM or until any of them ends; then shut all down cleanly."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server_tasks = [asyncio.create_task(s.serve()) for s in servers]
    loop_tasks = [asyncio.ensure_future(c) for c in loops]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait(
        [*server_tasks, *loop_tasks, stopper], return_when=asyncio.FIRST_COMPLETED
    )
    for t in loop_tasks:  # loops first: the worker stops its instances
        t.cancel()
    for t in loop_tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
    for s in servers:
        s.should_exit = True
    await asyncio.gather(*server_tasks, return_exceptions=True)
    stopper.cancel()
    for t in done:  # surface a crash of a server or loop
        if t is not stopper and not t.cancelled() and t.exception() is not None:
            raise t.exception()
