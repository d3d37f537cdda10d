"""SGLang's native routes (`/generate`, `/server_info`, `/get_model_info`, `/flush_cache`,
`/health_generate`, `/version`), vLLM's `/tokenize` and `/detokenize`, and
`GET /v1/models/{id}`, in the shapes those projects' clients read."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from specserve import __version__
from specserve.core import SamplingParams, SamplingParamsError
from specserve.engine.engine import RequestError
from specserve.engine.tokenizer import ChatTemplateError, Tokenizer
from specserve.server.api import APIError, ServerConfig, _DisconnectWatch, _Result, _Run
from specserve.server.async_engine import AsyncEngine
from specserve.server.metrics import ServerMetrics
from specserve.server.protocol import DetokenizeRequest, GenerateRequest, TokenizeRequest

HEALTH_TIMEOUT_S = 20.0
HEALTH_PARAMS = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def native_router(
    engine: AsyncEngine,
    config: ServerConfig,
    metrics: ServerMetrics,
    model_card: Callable[[], dict],
    server_info: Callable[[], Awaitable[dict]],
    dependencies: Sequence[Any],
) -> APIRouter:
    """`model_card` and `server_info` are the OpenAI model entry and /get_server_info's body;
    `dependencies` guard every route (the API key)."""
    router = APIRouter(dependencies=list(dependencies))
    eng = engine.engine
    tok = eng.tokenizer

    @router.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        try:
            prompts = body.prompts()
            sp = body.sampling_params
            start = body.logprob_start_len if body.return_logprob else -1
            top = body.top_logprobs_num if body.return_logprob else None
            params = sp.to_params(top if start >= 0 else None, top)
        except (ValueError, SamplingParamsError) as e:
            raise APIError(400, str(e)) from None
        rid = body.rid or uuid.uuid4().hex
        runs: list[_Run] = []
        try:
            for p_idx, prompt in enumerate(prompts):
                for i in range(params.n):
                    seed = None if params.seed is None else params.seed + i
                    sub = replace(params, n=1, seed=seed)
                    suffix = "" if len(prompts) * params.n == 1 else f"-{p_idx}-{i}"
                    run = _Run(engine, rid + suffix, prompt, sub, len(runs), p_idx)
                    await run.prime()
                    runs.append(run)
        except RequestError as e:
            for r in runs:
                await r.close()
            raise APIError(400, str(e)) from None
        fmt = _GenerateFormat(tok, body, max(start, 0))
        if body.stream:
            if len(runs) > 1:
                for r in runs:
                    await r.close()
                raise APIError(400, "stream supports one prompt with n=1", param="stream")
            return StreamingResponse(_stream(runs[0], fmt), media_type="text/event-stream")
        watcher = _DisconnectWatch(request, runs)
        try:
            results = [await r.collect(metrics) for r in runs]
        finally:
            await watcher.stop()
        if watcher.disconnected:
            return Response(status_code=499)
        bodies = [fmt.body(r, time.monotonic() - runs[0].start) for r in results]
        return JSONResponse(bodies[0] if len(bodies) == 1 else bodies)

    async def _stream(run: _Run, fmt: _GenerateFormat) -> AsyncIterator[str]:
        try:
            async for out in run.outputs(metrics):
                if out.new_text or out.finished or out.new_token_ids:
                    body = fmt.body(run.result, time.monotonic() - run.start)
                    yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await run.close()

    @router.get("/server_info")
    async def server_info_alias() -> Any:
        return await server_info()

    @router.get("/get_model_info")
    async def model_info() -> dict:
        raw = json.loads((Path(eng.config.model_path) / "config.json").read_text())
        return {
            "model_path": eng.config.model_path,
            "tokenizer_path": eng.config.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": raw.get("model_type"),
            "architectures": raw.get("architectures"),
        }

    @router.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        done = await engine.call(
            lambda: not eng.has_unfinished() and eng.block_manager.flush_prefix_cache()
        )
        if not done:
            raise APIError(400, "cache not flushed: requests are running or waiting")
        return Response("Cache flushed.\n", media_type="text/plain")

    @router.get("/health_generate")
    async def health_generate() -> Response:
        """Healthy when the engine generates one token within HEALTH_TIMEOUT_S."""
        run = _Run(engine, f"health-{uuid.uuid4().hex}", [0], HEALTH_PARAMS, 0, 0)

        async def one_token() -> _Result:
            await run.prime()
            return await run.collect(metrics)

        try:
            await asyncio.wait_for(one_token(), HEALTH_TIMEOUT_S)
        except (TimeoutError, RuntimeError, RequestError) as e:
            run.abort()
            raise APIError(503, f"the engine did not generate: {e}", type_="server_error") from None
        return Response(status_code=200)

    @router.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        text = body.prompt
        if body.messages is not None:
            try:
                text = tok.apply_chat_template(
                    [m.template_dict() for m in body.messages], body.add_generation_prompt
                )
            except (ChatTemplateError, ValueError) as e:
                raise APIError(400, str(e), param="messages") from None
        ids = tok.encode(text or "")
        strs = [tok.decode([t], skip_special_tokens=False) for t in ids]
        return {
            "count": len(ids),
            "max_model_len": eng.context_length,
            "tokens": ids,
            "token_strs": strs if body.return_token_strs else None,
        }

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        vocab = eng.model_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        check_model(model_id)
        return model_card()

    def check_model(name: str | None) -> None:
        if name and name != config.served_model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves "
                f"{config.served_model_name!r}",
                param="model",
                code="model_not_found",
            )

    return router


class _GenerateFormat:
    """SGLang's /generate body: text, output_ids and meta_info (finish_reason as a dict,
    spec accept length, logprobs as [logprob, token id, text or None] triples)."""

    def __init__(self, tok: Tokenizer, body: GenerateRequest, start: int) -> None:
        self.tok, self.req, self.start = tok, body, start

    def _triple(self, token: int, logprob: float | None) -> list:
        text = self.tok.decode([token]) if self.req.return_text_in_logprobs else None
        return [logprob, token, text]

    def body(self, r: _Result, elapsed: float) -> dict:
        meta = dict(r.meta_info or {})
        meta["finish_reason"] = self._finish(r)
        meta["e2e_latency"] = elapsed
        if self.req.return_logprob:
            meta.update(self._logprobs(r))
        return {"text": r.text, "output_ids": list(r.token_ids or []), "meta_info": meta}

    def _finish(self, r: _Result) -> dict | None:
        if r.finish_reason == "length":
            return {"type": "length", "length": len(r.token_ids or [])}
        if r.finish_reason == "stop":
            matched = r.stop_reason if r.stop_reason is not None else (r.token_ids or [None])[-1]
            return {"type": "stop", "matched": matched}
        if r.finish_reason is not None:
            return {"type": r.finish_reason}
        return None

    def _logprobs(self, r: _Result) -> dict:
        out = r.logprobs or []
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
