"""A tiny OpenAI-compatible server used as a custom backend in the cluster tests.

Usage (same shape as the seed's SGLang template):
    python fake_openai_server.py --model-path DIR --host H --port P [--served-model-name N]
Answers /health, /v1/models, /v1/completions, /v1/chat/completions (streaming too)
with a fixed text that names the port, so tests can tell instances apart.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

WORDS = ["Hello", " from", " the", " fake", " server"]


def build_app(model: str, port: int) -> FastAPI:
    app = FastAPI()
    text = "".join(WORDS) + f" on port {port}"

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "fake"}]}

    def chunks(kind: str):
        for i, word in enumerate([*WORDS, f" on port {port}"]):
            if kind == "chat":
                choice = {"index": 0, "delta": {"content": word}, "finish_reason": None}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": word, "finish_reason": None}
                obj = "text_completion"
            yield f"data: {json.dumps({'id': f'c{i}', 'object': obj, 'model': model, 'choices': [choice]})}\n\n"
        yield "data: [DONE]\n\n"

    def answer(kind: str, body: dict):
        if body.get("stream"):
            return StreamingResponse(chunks(kind), media_type="text/event-stream")
        usage = {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": "stop"}  # fmt: skip
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop"}
            obj = "text_completion"
        return {"id": "x", "object": obj, "created": int(time.time()), "model": model,
                "choices": [choice], "usage": usage, "pid": os.getpid()}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request):
        return answer("text", await request.json())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return answer("chat", await request.json())

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--served-model-name", default=None)
    args, _extra = p.parse_known_args()  # accept backend parameters like --tp-size
    if not os.path.exists(args.model_path):
        raise SystemExit(f"model path {args.model_path} does not exist")
    name = args.served_model_name or os.path.basename(args.model_path.rstrip("/"))
    print(f"fake server for {name} on {args.host}:{args.port}", flush=True)
    uvicorn.run(build_app(name, args.port), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
