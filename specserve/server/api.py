"""The OpenAI-compatible HTTP server (FastAPI): completions, chat, models, health, metrics, and
SGLang's / vLLM's native routes (`native_routes.py`).

Every request gets an id (`X-Request-Id`) and passes the `--api-key` check in middleware. Bad
input is a 400 with an OpenAI error body, a full queue a 429 with `Retry-After`, an internal error
a JSON 500 naming the request id and nothing else. Prompts are tokenised and checked off the
event loop and off the engine thread; a streaming response sends its headers at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from specserve import __version__
from specserve.core import SamplingParams, SamplingParamsError, choice_seed
from specserve.engine.engine import RequestError, RequestOutput
from specserve.engine.tokenizer import ChatTemplateError
from specserve.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    QueueFullError,
    QueueTimeoutError,
    RequestStream,
    ShutdownError,
)
from specserve.server.formats import ChatFormat, CompletionFormat, Format, Result
from specserve.server.metrics import ServerMetrics
from specserve.server.middleware import RequestGuard, request_id
from specserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    error_body,
    tool_plan,
)

log = logging.getLogger("specserve.server")

RETRY_AFTER_S = 1  # what a 429 asks the client to wait; the queue drains in step-sized bites


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    speculative_algorithm: str = "NONE"
    max_logprobs: int = 20  # --max-logprobs (vLLM's default)
    queue_timeout: float | None = None  # --queue-timeout: seconds to the first output
    disable_docs: bool = False  # --disable-fastapi-docs: no /docs, /redoc, /openapi.json
    tool_call_parser: str | None = None  # --tool-call-parser hermes | qwen25


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code, self.headers = code, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code or self.status)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": "OpenAI error body"} for c in codes}


_GENERATION_ERRORS = _errors(400, 401, 404, 429, 500, 503)


def create_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    off: dict[str, Any] = {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="specserve", version=__version__, **(off if config.disable_docs else {}))
    app.add_middleware(RequestGuard, api_key=config.api_key)
    metrics = ServerMetrics(lambda: engine.snapshot, config.served_model_name)
    app.state.engine, app.state.metrics, app.state.draining = engine, metrics, False
    _add_error_handlers(app, metrics)
    app.include_router(_info_router(app, config, metrics))
    generation = Generation(app, config, metrics)
    app.include_router(generation.router())
    from specserve.server.native_routes import native_router  # it imports this module

    app.include_router(native_router(generation))
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def drain(app: FastAPI, timeout: float) -> None:
    """Graceful shutdown: refuse new requests (503), give open ones `timeout` seconds, then
    abort the rest; their streams end with an error event."""
    app.state.draining = True
    engine: AsyncEngine = app.state.engine
    deadline = time.monotonic() + timeout
    while engine.num_open and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if engine.num_open:
        log.warning("shutdown: aborting %d unfinished requests", engine.num_open)
        engine.abort_all(ShutdownError("the server is shutting down"))


# -- errors ------------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def respond(request: Request, e: APIError) -> JSONResponse:
        metrics.errors.labels(metrics.model_name, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return respond(request, e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return respond(request, APIError(400, "request body is not valid JSON"))
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        return respond(request, APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return respond(request, APIError(e.status_code, str(e.detail), type_=type_))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        rid = request_id(request.scope)
        log.error("request %s failed: %s", rid, e, exc_info=e)
        resp = respond(request, _internal_error(rid))
        resp.headers["x-request-id"] = rid  # sent outside the middleware that adds it
        return resp


def _internal_error(rid: str) -> APIError:
    return APIError(500, f"internal server error (request id {rid})", type_="server_error")


def engine_error(e: Exception, rid: str) -> APIError:
    """The client's view of why the engine did not (fully) serve a request."""
    if isinstance(e, RequestError):
        return APIError(400, str(e))
    if isinstance(e, QueueFullError):
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return APIError(
            429, str(e), "rate_limit_error", code="rate_limit_exceeded", headers=headers
        )
    if isinstance(e, QueueTimeoutError | ShutdownError | EngineDeadError):
        return APIError(503, str(e), type_="server_error", code="service_unavailable")
    log.error("request %s failed in the engine: %s", rid, e)
    return _internal_error(rid)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without its 422 responses: this server answers bad input with 400."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for ops in schema["paths"].values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


# -- health, metrics, server info, models ------------------------------------------------------
def _info_router(app: FastAPI, config: ServerConfig, metrics: ServerMetrics) -> APIRouter:
    engine: AsyncEngine = app.state.engine
    router, created = APIRouter(), int(time.time())

    @router.get("/health", responses={200: {"description": "serving"}, **_errors(503)})
    async def health() -> Response:
        snap = engine.snapshot
        if not snap.alive:
            raise APIError(503, f"the engine loop is not running: {snap.error}", "server_error")
        if app.state.draining:
            raise APIError(503, "the server is shutting down", type_="server_error")
        return Response(status_code=200)

    @router.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/get_server_info")
    @router.get("/server_info")  # SGLang's newer name
    async def server_info() -> dict[str, Any]:
        e, snap = engine.engine, engine.snapshot  # only the engine's frozen config is read
        return {
            "version": __version__,
            "model_path": e.config.model_path,
            "served_model_name": config.served_model_name,
            "context_length": e.context_length,
            "max_running_requests": e.config.scheduler.max_running_requests,
            "max_queued_requests": engine.max_queued,
            "chunked_prefill_size": e.config.scheduler.chunked_prefill_size,
            "page_size": e.config.cache.page_size,
            "kv_cache_dtype": e.config.cache.kv_cache_dtype,  # the flag, as SGLang reports it
            "max_total_num_tokens": snap.max_total_num_tokens,
            "dtype": e.config.dtype,
            "device": e.config.device,
            "speculative_algorithm": config.speculative_algorithm,
            "internal_states": [
                {
                    "avg_spec_accept_length": snap.stats.avg_accept_length,
                    "num_running_reqs": snap.num_running,
                    "num_waiting_reqs": snap.num_waiting,
                    "kv_cache_usage": snap.kv_cache_usage,
                    "alive": snap.alive,
                    "error": snap.error,
                }
            ],
        }

    card = {
        "id": config.served_model_name,
        "object": "model",
        "created": created,
        "owned_by": "specserve",
        "root": engine.engine.config.model_path,
        "max_model_len": engine.engine.context_length,
    }

    @router.get("/v1/models", responses={200: {"model": ModelList}, **_errors(401)})
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @router.get("/v1/models/{model_id:path}", responses={200: {"model": ModelCard}, **_errors(404)})
    async def model(model_id: str) -> dict[str, Any]:
        check_model(config, model_id)
        return card

    return router


def check_model(config: ServerConfig, name: str | None) -> None:
    served = config.served_model_name
    if name and name != served:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


# -- completions and chat ----------------------------------------------------------------------
class Generation:
    """The two generation routes and what they share (with the native routes): checks,
    tokenising, submission, and the streamed or collected response."""

    def __init__(self, app: FastAPI, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics
        self.engine: AsyncEngine = app.state.engine

    def router(self) -> APIRouter:
        r = APIRouter(prefix="/v1")
        sse = {"text/event-stream": {"schema": {"type": "string"}}}
        r.post(
            "/completions",
            responses={200: {"model": CompletionResponse, "content": sse}, **_GENERATION_ERRORS},
        )(self.completions)
        r.post(
            "/chat/completions",
            responses={
                200: {"model": ChatCompletionResponse, "content": sse},
                **_GENERATION_ERRORS,
            },
        )(self.chat)
        return r

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        check_model(self.config, body.model)
        scoring_only = body.max_tokens == 0
        if scoring_only and not body.echo:
            raise APIError(400, "max_tokens=0 needs echo=true (scoring)", param="max_tokens")
        max_tokens = 1 if scoring_only else body.max_tokens
        params = self._params(body, max_tokens, body.logprobs, "logprobs")
        if body.echo:  # scoring: prefill only, the drafter never runs on the prompt
            params = replace(params, prompt_logprobs=body.logprobs)
        prompts = body.prompts()
        tok = self.engine.engine.tokenizer
        texts = await asyncio.to_thread(
            lambda: [
                p if isinstance(p, str) else tok.decode(p, skip_special_tokens=False)
                for p in prompts
            ]
        )
        fmt = CompletionFormat(
            f"cmpl-{uuid.uuid4().hex}",
            self.config.served_model_name,
            int(time.time()),
            tok,
            texts,
            echo=body.echo,
            scoring_only=scoring_only,
        )
        return await self._generate(request, body, prompts, params, fmt)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        check_model(self.config, body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        try:
            tools = tool_plan(body, self.config.tool_call_parser)
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice") from None
        max_tokens = body.max_tokens
        if body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self._params(body, max_tokens, logprobs, "top_logprobs")
        if tools.grammar is not None:
            if params.grammar is not None:
                raise APIError(400, "a forced tool call excludes response_format", param="tools")
            params = replace(params, grammar=tools.grammar)
        try:
            messages = [m.template_dict() for m in body.messages]
            prompt = await asyncio.to_thread(
                self.engine.engine.tokenizer.apply_chat_template,
                messages,
                body.add_generation_prompt,
                tools.render,
            )
        except (ChatTemplateError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from None
        fmt = ChatFormat(
            f"chatcmpl-{uuid.uuid4().hex}",
            self.config.served_model_name,
            int(time.time()),
            self.engine.engine.tokenizer,
            parse_tools=tools.parse,
            single_call=tools.single,
        )
        return await self._generate(request, body, [prompt], params, fmt)

    def _params(
        self, body: Any, max_tokens: int | None, logprobs: int | None, logprobs_field: str
    ) -> SamplingParams:
        cap = self.config.max_logprobs
        if logprobs is not None and logprobs > cap:
            msg = f"{logprobs_field} must be at most {cap} (--max-logprobs)"
            raise APIError(400, msg, param=logprobs_field)
        try:
            return body.sampling_params(max_tokens, logprobs)
        except SamplingParamsError as e:
            raise APIError(400, str(e)) from None

    def check_admission(self, total: int) -> None:
        """503 while draining; 400 for a request larger than the whole queue."""
        if self.app.state.draining:
            raise APIError(503, "the server is shutting down", type_="server_error")
        if total > self.engine.max_queued:
            raise APIError(
                400,
                f"this request asks for {total} completions (n × prompts); at most "
                f"{self.engine.max_queued} (--max-queued-requests)",
                param="n",
            )

    async def _generate(
        self,
        request: Request,
        body: Any,
        prompts: list[str | list[int]],
        params: SamplingParams,
        fmt: Format,
    ) -> Response:
        self.check_admission(len(prompts) * params.n)
        ids = await asyncio.to_thread(self.tokenize, prompts, params)
        runs = self.submit(ids, params, fmt.meta["id"], request_id(request.scope))
        if body.stream:
            opts = body.stream_options
            include_usage = bool(opts and opts.include_usage)
            fmt.continuous_usage = bool(opts and opts.continuous_usage_stats)
            stream = self._stream(runs, fmt, include_usage, request_id(request.scope))
            return EventStream(stream, lambda: close_runs(runs))
        results = await self.collect(request, runs)
        return Response(status_code=499) if results is None else JSONResponse(fmt.full(results))

    def tokenize(self, prompts: list[str | list[int]], params: SamplingParams) -> list[list[int]]:
        """Runs in a worker thread: tokenising a long prompt stalls neither loop."""
        engine = self.engine.engine
        out = []
        for p in prompts:
            ids = engine.tokenizer.encode(p) if isinstance(p, str) else list(p)
            try:
                engine.check_request(ids, params)
            except RequestError as e:
                raise APIError(400, str(e)) from None
            out.append(ids)
        return out

    def submit(
        self, prompts: list[list[int]], params: SamplingParams, rid: str, http_id: str
    ) -> list[Run]:
        """Every (prompt, choice) as one engine request, all admitted or none."""
        pairs = [(p, i) for p in range(len(prompts)) for i in range(params.n)]
        subs = [replace(params, n=1, seed=choice_seed(params.seed, i)) for _, i in pairs]
        ids = [f"{rid}-{p}-{i}" for p, i in pairs]
        try:
            streams = self.engine.add(
                [prompts[p] for p, _ in pairs], subs, ids, self.config.queue_timeout
            )
        except Exception as e:
            raise engine_error(e, http_id) from None
        return [Run(s, i, pairs[i][0], self.metrics) for i, s in enumerate(streams)]

    async def collect(self, request: Request, runs: list[Run]) -> list[Result] | None:
        """Every run's result; None if the client went away (the runs are aborted)."""
        watcher = _DisconnectWatch(request, runs)
        try:
            results = [await r.collect() for r in runs]
        except Exception as e:
            raise engine_error(e, request_id(request.scope)) from None
        finally:
            await watcher.stop()
            close_runs(runs)
        return None if watcher.disconnected else results

    async def _stream(
        self, runs: list[Run], fmt: Format, include_usage: bool, http_id: str
    ) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(run: Run) -> None:
            try:
                async for out in run.stream:
                    run.observe(out)
                    await queue.put((run, out))
            except Exception as e:
                await queue.put((run, e))
            await queue.put((run, None))

        tasks = [asyncio.create_task(pump(r)) for r in runs]
        pending = len(runs)
        try:
            for chunk in fmt.first_chunks(len(runs)):
                yield sse(chunk)
            while pending:
                run, item = await queue.get()
                if item is None:
                    pending -= 1
                elif isinstance(item, Exception):
                    yield sse(engine_error(item, http_id).body())
                elif (piece := fmt.chunk(run.index, item, run.result.prompt_index)) is not None:
                    if fmt.continuous_usage:
                        piece["usage"] = fmt.running_usage(item)
                    yield sse(piece)
            if include_usage:
                yield sse(fmt.usage_chunk([r.result for r in runs]))
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away: stop the pumps before closing
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            close_runs(runs)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends, even if the body never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Run:
    """One choice: its engine stream plus timing for the latency histograms."""

    def __init__(
        self, stream: RequestStream, index: int, prompt_index: int, metrics: ServerMetrics
    ) -> None:
        self.stream, self.index, self.metrics = stream, index, metrics
        self.result = Result(prompt_index=prompt_index)
        self.start = time.monotonic()
        self.last_time: float | None = None

    def observe(self, out: RequestOutput) -> None:
        now, metrics = time.monotonic(), self.metrics
        name = metrics.model_name
        if self.last_time is None:
            metrics.ttft.labels(name).observe(now - self.start)
        else:
            metrics.itl.labels(name).observe(now - self.last_time)
        self.last_time = now
        r = self.result
        r.text += out.new_text
        r.token_ids.extend(out.new_token_ids)
        r.logprobs.extend(out.logprobs)
        r.prompt_tokens, r.completion_tokens = out.prompt_tokens, out.completion_tokens
        r.cached_tokens, r.meta_info = out.cached_tokens, out.meta_info
        if out.prompt_logprobs is not None:
            r.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            r.finish_reason, r.stop_reason = out.finish_reason, out.stop_reason
            metrics.e2e.labels(name).observe(now - self.start)
            metrics.requests.labels(name, out.finish_reason).inc()

    async def collect(self) -> Result:
        async for out in self.stream:
            self.observe(out)
        return self.result


def close_runs(runs: list[Run]) -> None:
    for r in runs:
        r.stream.close()


class _DisconnectWatch:
    """Aborts a non-streaming request when its client disconnects (polled, as vLLM does)."""

    def __init__(self, request: Request, runs: list[Run], interval: float = 0.1) -> None:
        self.disconnected = False

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(interval)
            self.disconnected = True
            close_runs(runs)

        self.task = asyncio.create_task(watch())

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
