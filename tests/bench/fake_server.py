"""A fake OpenAI-compatible server for the benchmark tests (run as a script).

Streams `max_tokens` tokens per request: one token after --ttft-ms (prefill), then chunks
of --chunk-tokens tokens every --itl-ms, each chunk standing for one speculative verify
step with --spec-k draft tokens of which chunk-1 were accepted. It keeps the counters a
real server would (requests, prompt and generated tokens, drafts, accepted tokens per
position) and serves them on /metrics (vLLM style) and /get_server_info (SGLang style).
--fail-every N makes every Nth request fail (HTTP 500, or an error event mid-stream).
"""

from __future__ import annotations

import argparse
import asyncio
import json

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


def build_app(opts: argparse.Namespace) -> FastAPI:
    app = FastAPI()
    counters = {"requests": 0, "success": 0, "prompt_tokens": 0, "generation_tokens": 0}
    inflight = {"now": 0, "max": 0}
    spec = {"drafts": 0, "accepted": 0, "draft_tokens": 0}
    per_pos = [0] * opts.spec_k
    tokenizer = None
    if opts.tokenizer:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(f"{opts.tokenizer}/tokenizer.json")

    def count_prompt(prompt: str | list[int]) -> int:
        if isinstance(prompt, list):
            return len(prompt)
        if tokenizer is not None:
            return len(tokenizer.encode(prompt).ids)
        return len(prompt.split())

    def error(status: int, message: str) -> JSONResponse:
        body = {"error": {"message": message, "type": "server_error", "code": status}}
        return JSONResponse(body, status_code=status)

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": opts.model_name, "object": "model"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        if "metrics" not in opts.stats:
            return PlainTextResponse("not found", status_code=404)
        p = opts.metrics_prefix
        lines = [
            f"# TYPE {p}request_success_total counter",
            f'{p}request_success_total{{model_name="{opts.model_name}"}} {counters["success"]}',
            f"{p}prompt_tokens_total {counters['prompt_tokens']}",
            f"{p}generation_tokens_total {counters['generation_tokens']}",
            f"fake_max_inflight {inflight['max']}",
            f"# TYPE {p}spec_decode_num_drafts_total counter",
            f'{p}spec_decode_num_drafts_total{{engine="0"}} {float(spec["drafts"])}',
            f"{p}spec_decode_num_drafts_created 1.7e9",
            f'{p}spec_decode_num_accepted_tokens_total{{engine="0"}} {float(spec["accepted"])}',
            f'{p}spec_decode_num_draft_tokens_total{{engine="0"}} {float(spec["draft_tokens"])}',
        ]
        for k, n in enumerate(per_pos):
            name = f"{p}spec_decode_num_accepted_tokens_per_pos_total"
            lines.append(f'{name}{{engine="0",position="{k}"}} {float(n)}')
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.get("/get_server_info")
    async def server_info() -> JSONResponse:
        if "server_info" not in opts.stats:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        length = 1 + spec["accepted"] / spec["drafts"] if spec["drafts"] else 0.0
        return JSONResponse({"internal_states": [{"avg_spec_accept_length": length}]})

    async def generate(request: Request, chat: bool):
        body = await request.json()
        counters["requests"] += 1
        number = counters["requests"]
        if body.get("model") != opts.model_name:
            return error(404, f"The model `{body.get('model')}` does not exist.")
        failing = opts.fail_every and number % opts.fail_every == 0
        if failing and opts.fail_mode == "http":
            return error(500, f"injected failure on request {number}")
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        prompt_len = count_prompt(prompt)
        n = int(body["max_tokens"])
        usage_wanted = (body.get("stream_options") or {}).get("include_usage")

        def event(text: str | None, usage: dict | None = None) -> str:
            if chat:
                choices = [] if text is None else [{"index": 0, "delta": {"content": text}}]
            else:
                choices = [] if text is None else [{"index": 0, "text": text}]
            return f"data: {json.dumps({'choices': choices, 'usage': usage})}\n\n"

        async def stream():
            inflight["now"] += 1
            inflight["max"] = max(inflight["max"], inflight["now"])
            try:
                async for event_text in tokens():
                    yield event_text
            finally:
                inflight["now"] -= 1

        async def tokens():
            await asyncio.sleep(opts.ttft_ms / 1000)
            yield event(" t")
            sent = 1
            while sent < n:
                if failing and sent >= n // 2:
                    err = {"error": {"message": "injected mid-stream failure", "code": 500}}
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                m = min(opts.chunk_tokens, n - sent)
                await asyncio.sleep(opts.itl_ms / 1000)
                spec["drafts"] += 1
                spec["draft_tokens"] += opts.spec_k
                spec["accepted"] += m - 1
                for k in range(m - 1):
                    per_pos[k] += 1
                yield event(" t" * m)
                sent += m
            counters["success"] += 1
            counters["prompt_tokens"] += prompt_len
            counters["generation_tokens"] += n
            if usage_wanted and not opts.no_usage:
                usage = {"prompt_tokens": prompt_len, "completion_tokens": n}
                usage["total_tokens"] = prompt_len + n
                yield event(None, usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model-name", default="fake-model")
    p.add_argument("--chunk-tokens", type=int, default=1)
    p.add_argument("--spec-k", type=int, default=3)
    p.add_argument("--ttft-ms", type=float, default=5.0)
    p.add_argument("--itl-ms", type=float, default=2.0)
    p.add_argument("--stats", default="metrics,server_info", help="comma list, or none")
    p.add_argument("--metrics-prefix", default="vllm:")
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--fail-mode", choices=["http", "stream"], default="http")
    p.add_argument("--no-usage", action="store_true")
    p.add_argument("--tokenizer", default=None)
    opts = p.parse_args(argv)
    opts.stats = opts.stats.split(",")
    if not 1 <= opts.chunk_tokens <= opts.spec_k + 1:
        p.error("--chunk-tokens must be in [1, spec_k + 1]")
    return opts


if __name__ == "__main__":
    args = parse_args()
    uvicorn.run(build_app(args), host="127.0.0.1", port=args.port, log_level="warning")
