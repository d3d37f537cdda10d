"""Runs the engine loop on its own thread and hands each request's outputs to asyncio.

The engine is only ever touched from that thread: the server sends it commands (add, abort)
through a queue and receives `RequestOutput`s on a per-request asyncio queue. A failure inside a
step fails the requests of that step, never the server.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from specserve.core import SamplingParams
from specserve.engine.engine import LLMEngine, RequestError, RequestOutput

log = logging.getLogger("specserve.engine")


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


_ABORTED = object()  # ends a request's output stream after an abort


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.num_step_errors = 0

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout=10)

    # -- asyncio side --------------------------------------------------------------------
    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yields outputs until the request finishes. Raises RequestError before the first
        output if the engine refuses the request. Cancelling the iteration aborts it."""
        if not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running")
        out: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Add(request_id, prompt, params, out, asyncio.get_running_loop()))
        finished = False
        try:
            while True:
                item = await out.get()
                if item is _ABORTED:
                    finished = True
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort from any thread; the request's stream, if still read, then ends."""
        self._commands.put(_Abort(request_id))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Runs fn() on the engine thread between two steps and returns its result."""
        if not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(_Call(fn, future, loop))
        return await future

    # -- engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.engine.has_unfinished()
            try:  # block only while there is nothing to step
                cmd = self._commands.get_nowait() if busy else self._commands.get()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                self._handle(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self._stop.is_set():
                break
            if self.engine.has_unfinished():
                self._step()

    def _handle(self, cmd: _Add | _Abort | _Call | None) -> None:
        if isinstance(cmd, _Call):
            try:
                result = cmd.fn()
            except Exception as e:
                cmd.loop.call_soon_threadsafe(cmd.future.set_exception, e)
            else:
                cmd.loop.call_soon_threadsafe(cmd.future.set_result, result)
        elif isinstance(cmd, _Add):
            try:
                self.engine.add_request(cmd.prompt, cmd.params, cmd.request_id)
            except RequestError as e:
                cmd.loop.call_soon_threadsafe(cmd.out.put_nowait, e)
                return
            self._sinks[cmd.request_id] = (cmd.out, cmd.loop)
        elif isinstance(cmd, _Abort):
            sink = self._sinks.pop(cmd.request_id, None)
            if sink is not None:
                sink[1].call_soon_threadsafe(sink[0].put_nowait, _ABORTED)
            self.engine.abort(cmd.request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug or resource error must not kill the loop
            self.num_step_errors += 1
            log.error("engine step failed: %s\n%s", e, traceback.format_exc())
            for rid in list(self.engine.streams):
                self._fail(rid, RuntimeError(f"internal error while generating: {e}"))
                self.engine.abort(rid)
            return
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                sink[1].call_soon_threadsafe(sink[0].put_nowait, out)
                if out.finished:
                    del self._sinks[out.request_id]

    def _fail(self, request_id: str, error: Exception) -> None:
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink[1].call_soon_threadsafe(sink[0].put_nowait, error)
