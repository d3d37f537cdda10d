"""SGLang's native routes (`/generate`, `/get_model_info`, `/flush_cache`, `/health_generate`,
`/version`) and vLLM's `/tokenize` and `/detokenize`, in the shapes those projects' clients read.

They share the OpenAI routes' machinery (`api.Generation`): the same checks, admission,
tokenising off the event loop, `AsyncEngine.add`, the API key and the OpenAI error body.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from specserve import __version__
from specserve.core import SamplingParams, SamplingParamsError
from specserve.engine.tokenizer import ChatTemplateError, Tokenizer
from specserve.server.api import (
    APIError,
    EventStream,
    Generation,
    Run,
    check_model,
    close_runs,
    engine_error,
    sse,
)
from specserve.server.formats import Result
from specserve.server.middleware import request_id
from specserve.server.protocol import DetokenizeRequest, GenerateRequest, TokenizeRequest

HEALTH_TIMEOUT_S = 20.0
HEALTH_PARAMS = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def native_router(gen: Generation) -> APIRouter:
    router = APIRouter()
    _generate_route(router, gen)
    _engine_routes(router, gen)
    _tokenizer_routes(router, gen)
    return router


def _generate_route(router: APIRouter, gen: Generation) -> None:
    """SGLang's `/generate`: one prompt or a batch, streamed or collected."""
    config, tok = gen.config, gen.engine.engine.tokenizer

    @router.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        http_id = request_id(request.scope)
        try:
            prompts = body.prompts()
            start = body.logprob_start_len if body.return_logprob else -1
            top = body.top_logprobs_num if body.return_logprob else None
            if top is not None and top > config.max_logprobs:
                msg = f"top_logprobs_num must be at most {config.max_logprobs} (--max-logprobs)"
                raise APIError(400, msg, param="top_logprobs_num")
            params = body.sampling_params.to_params(top if start >= 0 else None, top)
        except (ValueError, SamplingParamsError) as e:
            raise APIError(400, str(e)) from None
        if body.stream and len(prompts) * params.n > 1:
            raise APIError(400, "stream supports one prompt with n=1", param="stream")
        gen.check_admission(len(prompts) * params.n)
        ids = await asyncio.to_thread(gen.tokenize, prompts, params)
        runs = gen.submit(ids, params, body.rid or uuid.uuid4().hex, http_id)
        fmt = _GenerateFormat(tok, body, max(start, 0))
        if body.stream:
            return EventStream(_stream(runs[0], fmt, http_id), lambda: close_runs(runs))
        results = await gen.collect(request, runs)
        if results is None:
            return Response(status_code=499)
        bodies = [fmt.body(r, time.monotonic() - runs[0].start) for r in results]
        return JSONResponse(bodies[0] if len(bodies) == 1 else bodies)


async def _stream(run: Run, fmt: _GenerateFormat, http_id: str) -> AsyncIterator[str]:
    try:
        async for out in run.stream:
            run.observe(out)
            if out.new_text or out.finished or out.new_token_ids:
                yield sse(fmt.body(run.result, time.monotonic() - run.start))
    except Exception as e:
        yield sse(engine_error(e, http_id).body())
    finally:
        run.stream.close()
    yield "data: [DONE]\n\n"


def _engine_routes(router: APIRouter, gen: Generation) -> None:
    """`/get_model_info`, `/flush_cache`, `/health_generate`, `/version`."""
    engine = gen.engine
    eng = engine.engine  # only what is fixed at start-up is read here (config, tokenizer)
    model_info_body = _model_info(eng.config.model_path)

    @router.get("/get_model_info")
    async def model_info() -> dict:
        return model_info_body

    @router.get("/flush_cache", operation_id="flush_cache_get")
    @router.post("/flush_cache", operation_id="flush_cache_post")
    async def flush_cache(request: Request) -> Response:
        try:
            done = await engine.call(
                lambda: not eng.has_unfinished() and eng.block_manager.flush_prefix_cache()
            )
        except Exception as e:  # a dead loop is a 503, like every route's
            raise engine_error(e, request_id(request.scope)) from None
        if not done:
            raise APIError(400, "cache not flushed: requests are running or waiting")
        return Response("Cache flushed.\n", media_type="text/plain")

    @router.get("/health_generate")
    async def health_generate() -> Response:
        """Healthy when the engine generates one token within HEALTH_TIMEOUT_S."""
        runs: list[Run] = []
        try:
            gen.check_admission(1)
            runs = gen.submit([[0]], HEALTH_PARAMS, f"health-{uuid.uuid4().hex}", "")
            await asyncio.wait_for(runs[0].collect(), HEALTH_TIMEOUT_S)
        except Exception as e:  # any failure, a full queue included, is unhealthy
            msg = e.message if isinstance(e, APIError) else str(e) or type(e).__name__
            raise APIError(503, f"the engine did not generate: {msg}", "server_error") from None
        finally:
            close_runs(runs)
        return Response(status_code=200)

    @router.get("/version")
    async def version() -> dict:
        return {"version": __version__}


def _tokenizer_routes(router: APIRouter, gen: Generation) -> None:
    """vLLM's `/tokenize` and `/detokenize`."""
    config, eng = gen.config, gen.engine.engine
    tok = eng.tokenizer

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(config, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        try:
            ids, strs = await asyncio.to_thread(_tokenize, tok, body)
        except (ChatTemplateError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from None
        return {
            "count": len(ids),
            "max_model_len": eng.context_length,
            "tokens": ids,
            "token_strs": strs if body.return_token_strs else None,
        }

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(config, body.model)
        vocab = eng.model_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(tok.decode, body.tokens)}


def _model_info(model_path: str) -> dict[str, Any]:
    raw = json.loads((Path(model_path) / "config.json").read_text())
    return {
        "model_path": model_path,
        "tokenizer_path": model_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": raw.get("model_type"),
        "architectures": raw.get("architectures"),
    }


def _tokenize(tok: Tokenizer, body: TokenizeRequest) -> tuple[list[int], list[str]]:
    """Runs in a worker thread: the prompt, or the messages through the chat template."""
    text = body.prompt
    if body.messages is not None:
        text = tok.apply_chat_template(
            [m.template_dict() for m in body.messages], body.add_generation_prompt
        )
    ids = tok.encode(text or "")
    return ids, [tok.decode([t], skip_special_tokens=False) for t in ids]


class _GenerateFormat:
    """SGLang's /generate body: text, output_ids and meta_info (finish_reason as a dict,
    spec accept length, logprobs as [logprob, token id, text or None] triples)."""

    def __init__(self, tok: Tokenizer, body: GenerateRequest, start: int) -> None:
        self.tok, self.req, self.start = tok, body, start

    def _triple(self, token: int, logprob: float | None) -> list:
        text = self.tok.decode([token]) if self.req.return_text_in_logprobs else None
        return [logprob, token, text]

    def body(self, r: Result, elapsed: float) -> dict:
        meta = dict(r.meta_info or {})
        meta["finish_reason"] = self._finish(r)
        meta["e2e_latency"] = elapsed
        if self.req.return_logprob:
            meta.update(self._logprobs(r))
        return {"text": r.text, "output_ids": list(r.token_ids), "meta_info": meta}

    def _finish(self, r: Result) -> dict | None:
        if r.finish_reason == "length":
            return {"type": "length", "length": len(r.token_ids)}
        if r.finish_reason == "stop":
            last = r.token_ids[-1] if r.token_ids else None
            matched = r.stop_reason if r.stop_reason is not None else last
            return {"type": "stop", "matched": matched}
        if r.finish_reason is not None:
            return {"type": r.finish_reason}
        return None

    def _logprobs(self, r: Result) -> dict:
        out = r.logprobs
        info: dict[str, Any] = {
            "output_token_logprobs": [self._triple(t, lp) for t, lp, _ in out],
        }
        if self.req.top_logprobs_num:
            info["output_top_logprobs"] = [
                [self._triple(t, lp) for t, lp in top] for _, _, top in out
            ]
        if self.req.logprob_start_len >= 0:
            prompt = (r.prompt_logprobs or [])[self.start :]
            info["input_token_logprobs"] = [self._triple(t, lp) for t, lp, _ in prompt]
            if self.req.top_logprobs_num:
                info["input_top_logprobs"] = [
                    [self._triple(t, v) for t, v in top] or None for _, _, top in prompt
                ]
        return info
