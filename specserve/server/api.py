"""The OpenAI-compatible HTTP server (FastAPI): completions, chat, models, health, metrics."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from specserve import __version__
from specserve.core import SamplingParams, SamplingParamsError
from specserve.engine.engine import RequestError, RequestOutput
from specserve.engine.tokenizer import ChatTemplateError, Tokenizer
from specserve.server.async_engine import AsyncEngine
from specserve.server.metrics import ServerMetrics
from specserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    tool_plan,
)
from specserve.server.tool_parser import StreamingToolParser, parse_tool_calls


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    speculative_algorithm: str = "NONE"
    tool_call_parser: str | None = None  # hermes | qwen25: read tool calls in chat output


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )


def create_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="specserve", version=__version__)
    metrics = ServerMetrics(engine.engine, config.served_model_name)
    app.state.engine, app.state.metrics = engine, metrics
    created = int(time.time())

    def err(status: int, message: str, **kw: Any) -> JSONResponse:
        code = kw.pop("code", None)
        metrics.errors.labels(config.served_model_name, str(status)).inc()
        return JSONResponse(error_body(message, code=code or status, **kw), status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return err(e.status, e.message, type_=e.type, param=e.param, code=e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return err(400, "request body is not valid JSON")
        return err(400, f"{loc}: {msg}" if loc else msg, param=loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return err(e.status_code, str(e.detail), type_=type_)

    def check_api_key(request: Request) -> None:
        if config.api_key and request.headers.get("authorization") != f"Bearer {config.api_key}":
            raise APIError(
                401,
                "invalid or missing API key",
                type_="authentication_error",
                code="invalid_api_key",
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    def check_model(name: str | None) -> None:
        if name and name != config.served_model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves "
                f"{config.served_model_name!r}",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health() -> Response:
        if not engine._thread.is_alive():
            return err(503, "engine loop is not running", type_="server_error")
        return Response(status_code=200)

    def model_card() -> dict:
        return {
            "id": config.served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "specserve",
            "root": engine.engine.config.model_path,
            "max_model_len": engine.engine.context_length,
        }

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/get_server_info")
    async def server_info() -> dict:
        e = engine.engine
        return {
            "version": __version__,
            "model_path": e.config.model_path,
            "served_model_name": config.served_model_name,
            "context_length": e.context_length,
            "max_running_requests": e.config.scheduler.max_running_requests,
            "chunked_prefill_size": e.config.scheduler.chunked_prefill_size,
            "page_size": e.config.cache.page_size,
            "max_total_num_tokens": e.block_manager.num_blocks * e.block_manager.page_size,
            "dtype": e.config.dtype,
            "device": e.config.device,
            "speculative_algorithm": config.speculative_algorithm,
            "internal_states": [
                {
                    "avg_spec_accept_length": e.stats.avg_accept_length,
                    "num_running_reqs": len(e.scheduler.running),
                    "num_waiting_reqs": len(e.scheduler.waiting),
                    "kv_cache_usage": e.block_manager.usage,
                }
            ],
        }

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        scoring_only = body.max_tokens == 0
        if scoring_only and not body.echo:
            raise APIError(400, "max_tokens=0 needs echo=true (scoring)", param="max_tokens")
        params = _params(body, 1 if scoring_only else body.max_tokens, body.logprobs)
        if body.echo:  # scoring: prefill only, the drafter never runs on the prompt
            params = replace(params, prompt_logprobs=body.logprobs)
        prompts = body.prompts()
        rid = f"cmpl-{uuid.uuid4().hex}"
        runs = await _start_all(prompts, params, rid)
        tok = engine.engine.tokenizer
        fmt = _CompletionFormat(rid, config.served_model_name, created=int(time.time()), tok=tok)
        fmt.prompt_texts = [
            p if isinstance(p, str) else tok.decode(p, skip_special_tokens=False) for p in prompts
        ]
        fmt.echo, fmt.scoring_only = body.echo, scoring_only
        fmt.prompt_of = [r.result.prompt_index for r in runs]
        return await _respond(request, body.stream, body.stream_options, runs, fmt)

    @v1.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        try:
            tools = tool_plan(body, config.tool_call_parser)
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice") from None
        try:
            messages = [m.template_dict() for m in body.messages]
            prompt = engine.engine.tokenizer.apply_chat_template(
                messages, body.add_generation_prompt, tools.render
            )
        except (ChatTemplateError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from None
        top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        params = _params(
            body,
            body.max_completion_tokens or body.max_tokens,
            (top or 0) if body.logprobs else None,
        )
        if tools.grammar is not None:
            if params.grammar is not None:
                raise APIError(400, "a forced tool call excludes response_format", param="tools")
            params = replace(params, grammar=tools.grammar)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        runs = await _start_all([prompt], params, rid)
        fmt = _ChatFormat(
            rid, config.served_model_name, created=int(time.time()), tok=engine.engine.tokenizer
        )
        fmt.parse_tools, fmt.single_call = tools.parse, tools.single
        return await _respond(request, body.stream, body.stream_options, runs, fmt)

    async def _start_all(prompts, params: SamplingParams, rid: str) -> list[_Run]:
        """Submit every (prompt, choice) and wait until the engine accepted all of them."""
        runs: list[_Run] = []
        try:
            for p_idx, prompt in enumerate(prompts):
                for i in range(params.n):
                    sub = replace(
                        params, n=1, seed=None if params.seed is None else params.seed + i
                    )
                    run = _Run(engine, f"{rid}-{p_idx}-{i}", prompt, sub, len(runs), p_idx)
                    await run.prime()
                    runs.append(run)
        except RequestError as e:
            for r in runs:
                await r.close()
            raise APIError(400, str(e)) from None
        return runs

    async def _respond(request, stream, stream_options, runs, fmt) -> Response:
        if stream:
            include_usage = bool(stream_options and stream_options.include_usage)
            fmt.continuous_usage = bool(stream_options and stream_options.continuous_usage_stats)
            gen = _stream(request, runs, fmt, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream")
        watcher = _DisconnectWatch(request, runs)
        try:
            results = [await r.collect(metrics) for r in runs]
        finally:
            await watcher.stop()
        if watcher.disconnected:
            return Response(status_code=499)
        return JSONResponse(fmt.full(results))

    async def _stream(request, runs, fmt, include_usage) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(run: _Run) -> None:
            try:
                async for out in run.outputs(metrics):
                    await queue.put((run, out))
            except Exception as e:
                await queue.put((run, e))
            await queue.put((run, None))

        tasks = [asyncio.create_task(pump(r)) for r in runs]
        pending = len(runs)
        try:
            for chunk in fmt.first_chunks(len(runs)):
                yield _sse(chunk)
            while pending:
                run, item = await queue.get()
                if item is None:
                    pending -= 1
                    continue
                if isinstance(item, Exception):
                    yield _sse(error_body(f"internal error: {item}", "server_error", code=500))
                    continue
                chunk = fmt.chunk(run.index, item)
                if chunk is not None:
                    if fmt.continuous_usage:
                        chunk["usage"] = fmt.running_usage(item)
                    yield _sse(chunk)
            if include_usage:
                yield _sse(fmt.usage_chunk([r.result for r in runs]))
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the generator is closed)
            for t in tasks:
                t.cancel()
            for r in runs:
                await r.close()

    app.include_router(v1)
    from specserve.server.native_routes import native_router  # it imports this module

    app.include_router(
        native_router(engine, config, metrics, model_card, server_info, [Depends(check_api_key)])
    )
    return app


def _params(body, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    try:
        return body.sampling_params(max_tokens, logprobs)
    except SamplingParamsError as e:
        raise APIError(400, str(e)) from None


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@dataclass
class _Result:
    text: str = ""
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    stop_reason: Any = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list | None = None
    meta_info: dict | None = None
    prompt_index: int = 0
    prompt_logprobs: list | None = None


class _Run:
    """One choice: its engine stream plus timing for the latency histograms."""

    def __init__(
        self,
        engine: AsyncEngine,
        request_id: str,
        prompt,
        params: SamplingParams,
        index: int,
        prompt_index: int,
    ) -> None:
        self.engine, self.request_id, self.index = engine, request_id, index
        self.stream = engine.generate(prompt, params, request_id)
        self.first: RequestOutput | None = None
        self.result = _Result(token_ids=[], logprobs=[], prompt_index=prompt_index)
        self.start = time.monotonic()
        self.last_time: float | None = None

    async def prime(self) -> None:
        """Wait for the first output, so a refused request fails before any response starts."""
        try:
            self.first = await self.stream.__anext__()
        except StopAsyncIteration:
            self.first = None

    async def outputs(self, metrics: ServerMetrics) -> AsyncIterator[RequestOutput]:
        if self.first is not None:
            out, self.first = self.first, None
            self._observe(out, metrics)
            yield out
            if out.finished:
                return
        async for out in self.stream:
            self._observe(out, metrics)
            yield out

    def _observe(self, out: RequestOutput, metrics: ServerMetrics) -> None:
        now, name = time.monotonic(), metrics.model_name
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

    async def collect(self, metrics: ServerMetrics) -> _Result:
        async for _ in self.outputs(metrics):
            pass
        return self.result

    def abort(self) -> None:
        """Safe while another task is reading the stream: that reader then sees its end."""
        self.engine.abort(self.request_id)

    async def close(self) -> None:
        """Called by the stream's reader when it stops reading (aborts if still running)."""
        await self.stream.aclose()


class _DisconnectWatch:
    """Aborts a non-streaming request when its client disconnects (polled, as vLLM does)."""

    def __init__(self, request: Request, runs: list[_Run], interval: float = 0.1) -> None:
        self.disconnected = False

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(interval)
            self.disconnected = True
            for r in runs:
                r.abort()

        self.task = asyncio.create_task(watch())

    async def stop(self) -> None:
        self.task.cancel()


def _usage(results: list[_Result]) -> dict:
    # the n choices of one prompt share it: count each prompt once
    prompt = sum({r.prompt_index: r.prompt_tokens for r in results}.values())
    completion = sum(r.completion_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class _Format:
    """OpenAI response bodies for one request id: stream chunks, the usage chunk, the full body."""

    object_full = object_chunk = ""
    continuous_usage = False  # stream_options.continuous_usage_stats

    def __init__(self, rid: str, model: str, created: int, tok: Tokenizer) -> None:
        self.tok = tok
        self.meta = {"id": rid, "created": created, "model": model}

    def _content(self, text: str, streaming: bool) -> dict: ...

    def _logprobs(self, entries: list) -> dict: ...

    def first_chunks(self, n: int) -> list[dict]:
        return []

    def _body(self, streaming: bool, **fields: Any) -> dict:
        kind = self.object_chunk if streaming else self.object_full
        return {
            "id": self.meta["id"],
            "object": kind,
            "created": self.meta["created"],
            "model": self.meta["model"],
            **fields,
        }

    def _choice(
        self,
        index: int,
        text: str,
        logprobs: list,
        finish_reason: str | None,
        stop_reason: Any,
        meta_info: dict | None,
        streaming: bool,
    ) -> dict:
        choice = {
            "index": index,
            **self._content(text, streaming),
            "logprobs": self._logprobs(logprobs) if logprobs else None,
            "finish_reason": finish_reason,
        }
        if finish_reason is not None:
            choice.update(stop_reason=stop_reason, meta_info=meta_info)
        return choice

    def chunk(self, index: int, out: RequestOutput) -> dict | None:
        if not out.new_text and not out.logprobs and not out.finished:
            return None
        choice = self._choice(
            index,
            out.new_text,
            out.logprobs,
            out.finish_reason,
            out.stop_reason,
            out.meta_info,
            streaming=True,
        )
        return self._body(True, choices=[choice])

    def usage_chunk(self, results: list[_Result]) -> dict:
        return self._body(True, choices=[], usage=_usage(results))

    def running_usage(self, out: RequestOutput) -> dict:
        """The usage of the choice a chunk belongs to, so far (vLLM's continuous usage)."""
        return {
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
        }

    def full(self, results: list[_Result]) -> dict:
        choices = [
            self._choice(
                i, r.text, r.logprobs, r.finish_reason, r.stop_reason, r.meta_info, streaming=False
            )
            for i, r in enumerate(results)
        ]
        return self._body(False, choices=choices, usage=_usage(results))


class _CompletionFormat(_Format):
    """Completions, with `echo` (the prompt and its logprobs before the output) and pure
    scoring (`max_tokens: 0`: the one token generated to finish the prefill is dropped)."""

    object_full = object_chunk = "text_completion"
    echo = scoring_only = False
    prompt_texts: list[str] = []
    prompt_of: list[int] = []  # choice -> prompt index

    def __init__(self, rid: str, model: str, created: int, tok: Tokenizer) -> None:
        super().__init__(rid, model, created, tok)
        self.offsets: dict[int, int] = {}  # choice -> text_offset of its next token

    def _content(self, text: str, streaming: bool) -> dict:
        return {"text": text}

    def _logprobs(self, entries: list) -> dict:
        return _completion_logprobs(entries, self.tok)

    def _with_echo(
        self, index: int, prompt_index: int, text: str, logprobs: list, prompt_logprobs
    ) -> tuple[str, dict | None]:
        """The choice's text and logprobs (text_offset continuing across stream chunks)."""
        if self.scoring_only:
            text, logprobs = "", []
        first = index not in self.offsets
        if first:
            self.offsets[index] = 0 if self.echo else len(self.prompt_texts[prompt_index])
        if first and self.echo:
            text = self.prompt_texts[prompt_index] + text
            logprobs = list(prompt_logprobs or []) + list(logprobs)
        if not logprobs:
            return text, None
        body = _completion_logprobs(logprobs, self.tok, self.offsets[index])
        self.offsets[index] += sum(len(t) for t in body["tokens"])
        return text, body

    def chunk(self, index: int, out: RequestOutput) -> dict | None:
        text, lp = self._with_echo(
            index, self.prompt_of[index], out.new_text, out.logprobs, out.prompt_logprobs
        )
        if not text and not lp and not out.finished:
            return None
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": None}
        if out.finished:
            choice.update(
                finish_reason=out.finish_reason,
                stop_reason=out.stop_reason,
                meta_info=out.meta_info,
            )
        return self._body(True, choices=[choice])

    def full(self, results: list[_Result]) -> dict:
        choices = []
        for i, r in enumerate(results):
            text, lp = self._with_echo(
                i, r.prompt_index, r.text, r.logprobs or [], r.prompt_logprobs
            )
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": lp,
                    "finish_reason": r.finish_reason,
                    "stop_reason": r.stop_reason,
                    "meta_info": r.meta_info,
                }
            )
        return self._body(False, choices=choices, usage=self._usage(results))

    def usage_chunk(self, results: list[_Result]) -> dict:
        return self._body(True, choices=[], usage=self._usage(results))

    def _usage(self, results: list[_Result]) -> dict:
        if self.scoring_only:
            results = [replace(r, completion_tokens=0) for r in results]
        return _usage(results)


class _ChatFormat(_Format):
    """Chat bodies; with tools, the output's tool calls become `tool_calls` (whole calls in
    streamed deltas, finish_reason `tool_calls`)."""

    object_full, object_chunk = "chat.completion", "chat.completion.chunk"
    parse_tools = single_call = False

    def __init__(self, rid: str, model: str, created: int, tok: Tokenizer) -> None:
        super().__init__(rid, model, created, tok)
        self.parsers: dict[int, StreamingToolParser] = {}

    def _calls(self, calls: list, before: int) -> list:
        return calls[: max(0, 1 - before)] if self.single_call else calls

    def chunk(self, index: int, out: RequestOutput) -> dict | None:
        if not self.parse_tools:
            return super().chunk(index, out)
        parser = self.parsers.setdefault(index, StreamingToolParser())
        before = parser.num_calls
        text, calls = parser.feed(out.new_text, final=out.finished)
        calls = self._calls(calls, before)
        delta: dict[str, Any] = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = [c.to_openai(before + k) for k, c in enumerate(calls)]
        if not delta and not out.logprobs and not out.finished:
            return None
        finish = out.finish_reason
        if finish == "stop" and parser.num_calls:
            finish = "tool_calls"
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": self._logprobs(out.logprobs) if out.logprobs else None,
            "finish_reason": finish,
        }
        if out.finished:
            choice.update(stop_reason=out.stop_reason, meta_info=out.meta_info)
        return self._body(True, choices=[choice])

    def full(self, results: list[_Result]) -> dict:
        body = super().full(results)
        for choice in body["choices"] if self.parse_tools else []:
            content, calls = parse_tool_calls(choice["message"]["content"])
            calls = self._calls(calls, 0)
            if calls:
                choice["message"] = {
                    "role": "assistant",
                    "content": content or None,
                    "tool_calls": [c.to_openai() for c in calls],
                }
                if choice["finish_reason"] == "stop":
                    choice["finish_reason"] = "tool_calls"
        return body

    def _content(self, text: str, streaming: bool) -> dict:
        if streaming:
            return {"delta": {"content": text} if text else {}}
        return {"message": {"role": "assistant", "content": text}}

    def _logprobs(self, entries: list) -> dict:
        return _chat_logprobs(entries, self.tok)

    def first_chunks(self, n: int) -> list[dict]:
        first = {
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return [self._body(True, choices=[{"index": i, **first}]) for i in range(n)]


def _completion_logprobs(entries: list, tok: Tokenizer, offset: int = 0) -> dict:
    """OpenAI's legacy logprobs; an entry with logprob None (the first prompt token under
    echo) has top_logprobs None; text_offset counts characters from `offset`."""

    def s(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    tokens = [s(t) for t, _, _ in entries]
    starts = [offset + n for n in itertools.accumulate((len(t) for t in tokens), initial=0)]
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [
            None if lp is None else {s(t): v for t, v in top} for _, lp, top in entries
        ],
        "text_offset": starts[:-1],
    }


def _chat_logprobs(entries: list, tok: Tokenizer) -> dict:
    def item(t: int, lp: float) -> dict:
        s = tok.decode([t], skip_special_tokens=False)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {
        "content": [
            {**item(t, lp), "top_logprobs": [item(a, b) for a, b in top]} for t, lp, top in entries
        ]
    }
