"""Runs the engine loop on its own thread and hands each request's outputs to asyncio.

The engine is only ever touched from that thread: the server sends it commands (add, abort, call)
through a queue, receives `RequestOutput`s on a per-request `RequestStream`, and reads the engine's
state only from the `EngineSnapshot` the thread publishes after every iteration. A failure inside
a step fails the request it belongs to (or, when it cannot be narrowed, the requests of that step),
never the server; if the loop itself dies, every open request fails, the snapshot says why and
`on_death` is called so the process can exit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from specserve.core import SamplingParams
from specserve.engine.engine import (
    EngineStats,
    LLMEngine,
    RequestError,
    RequestFailed,
    RequestOutput,
)

log = logging.getLogger("specserve.engine")


class EngineDeadError(RuntimeError):
    """The engine loop is not running; no request can be served (HTTP 503)."""


class QueueFullError(RuntimeError):
    """More requests are queued than `--max-queued-requests` allows (HTTP 429)."""


class QueueTimeoutError(RuntimeError):
    """A request produced no output within `--queue-timeout` and was aborted (HTTP 503)."""


class GenerationError(RuntimeError):
    """A request failed inside the engine; the message is for the log, not the client (500)."""


class ShutdownError(RuntimeError):
    """The server shut down before the request finished (HTTP 503)."""


@dataclass(frozen=True)
class EngineSnapshot:
    """What the HTTP layer may read about the engine; replaced (never mutated) by its thread."""

    alive: bool = True
    error: str | None = None  # why the loop died
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    max_total_num_tokens: int = 0
    num_preemptions: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    num_step_errors: int = 0
    stats: EngineStats = field(default_factory=EngineStats)


_ABORTED = object()  # ends a request's output stream after an abort


class RequestStream:
    """One request's outputs on the event loop: `async for out in stream`. Raises the request's
    error, if any; `close()` aborts it unless it has finished."""

    def __init__(
        self, engine: AsyncEngine, request_id: str, queue_timeout: float | None = None
    ) -> None:
        self.engine, self.request_id = engine, request_id
        self.items: asyncio.Queue = asyncio.Queue()
        self.finished = self.started = False
        self.deadline = None if queue_timeout is None else time.monotonic() + queue_timeout

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item: Any = await (self.items.get() if self.started else self._first())
        self._leave_queue()
        if item is _ABORTED or isinstance(item, Exception) or item.finished:
            self._finish()
        if item is _ABORTED:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item

    async def _first(self) -> object:
        if self.deadline is None:
            return await self.items.get()
        try:
            return await asyncio.wait_for(self.items.get(), self.deadline - time.monotonic())
        except TimeoutError:
            self.close()
            raise QueueTimeoutError(
                "the request waited in the queue beyond --queue-timeout"
            ) from None

    def _leave_queue(self) -> None:
        if not self.started:
            self.started = True
            self.engine.num_queued -= 1

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.num_open -= 1

    def close(self) -> None:
        """Stop reading: abort the request if it is still running."""
        self._leave_queue()
        if not self.finished:
            self._finish()
            self.engine.abort(self.request_id)


@dataclass
class _Add:
    prompt: list[int]
    params: SamplingParams
    stream: RequestStream
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_id: str | None  # None: every open request
    error: Exception | None = None  # delivered to the stream instead of a plain end


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def settle(self, result: Any, error: BaseException | None) -> None:
        """From the engine thread: resolve the future unless its caller has gone."""

        def resolve() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(resolve)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_death: Callable[[str], None] | None = None) -> None:
        self.engine, self.on_death = engine, on_death
        self.max_queued = engine.config.scheduler.max_queued_requests
        self.num_queued = 0  # submitted, no output yet (event-loop side)
        self.num_open = 0  # submitted, not finished or closed (event-loop side)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()  # orders submissions against the loop's death
        self._worker = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._num_step_errors = 0
        self._publish()

    def start(self) -> None:
        self._worker.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self._worker.join(timeout=10)

    # -- asyncio side --------------------------------------------------------------------
    def add(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        request_ids: list[str],
        queue_timeout: float | None = None,
    ) -> list[RequestStream]:
        """Submit requests together (all or none): raises QueueFullError or EngineDeadError.
        Prompts are token ids already checked with `LLMEngine.check_request`."""
        if self.num_queued + len(prompts) > self.max_queued:
            raise QueueFullError(
                f"{self.num_queued} requests are queued (--max-queued-requests "
                f"{self.max_queued}); retry later"
            )
        loop = asyncio.get_running_loop()
        streams = [RequestStream(self, rid, queue_timeout) for rid in request_ids]
        with self._lock:
            if not self.snapshot.alive:
                raise EngineDeadError(f"the engine loop is not running: {self.snapshot.error}")
            for prompt, p, s in zip(prompts, params, streams, strict=True):
                self._commands.put(_Add(prompt, p, s, loop))
        self.num_queued += len(streams)
        self.num_open += len(streams)
        return streams

    def abort(self, request_id: str, error: Exception | None = None) -> None:
        """Abort from any thread; the request's stream, if still read, ends (or raises error)."""
        self._commands.put(_Abort(request_id, error))

    def abort_all(self, error: Exception) -> None:
        """Abort every open request; their streams raise `error` (used at shutdown)."""
        self._commands.put(_Abort(None, error))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn() on the engine thread between two steps and return its result (or raise its
        exception); for the few routes that must act on the engine itself (/flush_cache)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if not self.snapshot.alive or self._stop.is_set():
                raise EngineDeadError(f"the engine loop is not running: {self.snapshot.error}")
            self._commands.put(_Call(fn, future, loop))
        return await future

    # -- engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._iterate()
        except BaseException as e:  # a bug in the loop itself: fail loudly, never hang
            log.exception("the engine loop died")
            self._die(f"{type(e).__name__}: {e}")

    def _iterate(self) -> None:
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
        if not self._stop.is_set() and self.engine.has_unfinished():
            self._step()
        self._publish()

    def _handle(self, cmd: _Add | _Abort | _Call | None) -> None:
        if isinstance(cmd, _Add):
            self._add(cmd)
        elif isinstance(cmd, _Call):
            self._call(cmd)
        elif isinstance(cmd, _Abort):
            ids = list(self._sinks) if cmd.request_id is None else [cmd.request_id]
            for rid in ids:
                self._end(rid, _ABORTED if cmd.error is None else cmd.error)
                self.engine.abort(rid)

    def _call(self, cmd: _Call) -> None:
        try:
            result = cmd.fn()
        except Exception as e:
            cmd.settle(None, e)
        else:
            cmd.settle(result, None)

    def _add(self, cmd: _Add) -> None:
        rid = cmd.stream.request_id
        try:
            self.engine.add_request(cmd.prompt, cmd.params, rid)
        except Exception as e:
            if not isinstance(e, RequestError):
                log.exception("adding request %s failed", rid)
                e = GenerationError(f"adding the request failed: {type(e).__name__}: {e}")
            cmd.loop.call_soon_threadsafe(cmd.stream.items.put_nowait, e)
            return
        self._sinks[rid] = (cmd.stream, cmd.loop)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except RequestFailed as e:  # narrowed to one request: the others step again
            self._step_failed(e, [e.request_id])
            return
        except Exception as e:  # not narrowed: the requests the step ran
            running = [r.request_id for r in self.engine.scheduler.running]
            self._step_failed(e, running or list(self.engine.streams))
            return
        for out in outputs:
            if out.error is not None:
                self._num_step_errors += 1
                self._end(out.request_id, GenerationError(out.error))
            elif out.finished:
                self._end(out.request_id, out)
            elif out.request_id in self._sinks:
                stream, loop = self._sinks[out.request_id]
                loop.call_soon_threadsafe(stream.items.put_nowait, out)

    def _step_failed(self, e: Exception, request_ids: list[str]) -> None:
        self._num_step_errors += 1
        log.exception("engine step failed; failing %d request(s)", len(request_ids))
        for rid in request_ids:
            self._end(rid, GenerationError(f"{type(e).__name__}: {e}"))
            self.engine.abort(rid)

    def _end(self, request_id: str, last: object) -> None:
        """Deliver a request's last item (output, error or _ABORTED) and forget its stream."""
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink[1].call_soon_threadsafe(sink[0].items.put_nowait, last)

    def _publish(self) -> None:
        e = self.engine
        st = replace(e.stats, accepted_per_position=list(e.stats.accepted_per_position))
        bm = e.block_manager
        self.snapshot = EngineSnapshot(
            num_running=len(e.scheduler.running),
            num_waiting=len(e.scheduler.waiting),
            kv_cache_usage=bm.usage,
            max_total_num_tokens=bm.num_blocks * bm.page_size,
            num_preemptions=e.scheduler.num_preemptions,
            prefix_query_tokens=bm.prefix_query_tokens,
            prefix_hit_tokens=bm.prefix_hit_tokens,
            num_step_errors=self._num_step_errors,
            stats=st,
        )

    def _die(self, reason: str) -> None:
        with self._lock:
            self.snapshot = replace(self.snapshot, alive=False, error=reason)
        error = EngineDeadError(f"the engine loop died: {reason}")
        for rid in list(self._sinks):
            self._end(rid, error)
        while True:  # requests submitted before the loop was marked dead
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add):
                cmd.loop.call_soon_threadsafe(cmd.stream.items.put_nowait, error)
            elif isinstance(cmd, _Call):
                cmd.settle(None, error)
        if self.on_death is not None:
            self.on_death(reason)
