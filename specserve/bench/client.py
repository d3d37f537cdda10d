"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

`openai` posts to /v1/completions (prompt as text or a list of token ids), `openai-chat`
to /v1/chat/completions. Both ask for `stream_options.include_usage` so that token counts
come from the server. A chunk counts as output only if it carries text; the usage-only
final chunk and `[DONE]` do not, as in `sglang.bench_serving`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from specserve.bench.metrics import RequestTrace

BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    ignore_eos: bool = False


def build_payload(
    backend: str, model: str, prompt: str | list[int], max_tokens: int, sampling: Sampling
) -> dict:
    payload: dict = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": sampling.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if backend == "openai-chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    if sampling.ignore_eos:  # not OpenAI's; SGLang, vLLM and specserve accept it
        payload["ignore_eos"] = True
    return payload


def error_message(body: bytes) -> str:
    """The message of an OpenAI/vLLM/FastAPI error body, else the body itself (shortened)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("detail") or err)
        elif err:
            text = str(obj.get("message") or err)
    return text[:300]


def _chunk_text(data: dict, chat: bool) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def stream_request(
    http: httpx.AsyncClient,
    url: str,
    payload: dict,
    prompt_len: int,
    count_tokens: Callable[[str], int] | None = None,
) -> RequestTrace:
    """Send one streaming request and time it. Never raises for server or network errors:
    the trace says `success=False` and why. Without a usage chunk the output length is the
    retokenized text (`count_tokens`) or, lacking a tokenizer, the requested max_tokens."""
    chat = "messages" in payload
    trace = RequestTrace(prompt_len=prompt_len)
    usage: dict = {}
    st = time.perf_counter()
    trace.start_time = st
    last = st
    text_parts: list[str] = []
    try:
        async with http.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                trace.error = f"HTTP {resp.status_code}: {error_message(await resp.aread())}"
                return trace
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                body = line[5:].strip()
                if body == "[DONE]":
                    break
                data = json.loads(body)
                if "error" in data or data.get("object") == "error":
                    trace.error = f"error in stream: {error_message(body.encode())}"
                    return trace
                usage = data.get("usage") or usage
                piece = _chunk_text(data, chat)
                if not piece:
                    continue
                now = time.perf_counter()
                if not text_parts:
                    trace.ttft = now - st
                else:
                    trace.itl.append(now - last)
                last = now
                text_parts.append(piece)
        trace.latency = time.perf_counter() - st
    except (httpx.HTTPError, ValueError) as e:
        trace.error = f"{type(e).__name__}: {e}"
        return trace
    trace.generated_text = "".join(text_parts)
    if not text_parts:
        trace.error = "stream ended with no output text"
        return trace
    trace.success = True
    trace.prompt_len = int(usage.get("prompt_tokens") or prompt_len)
    if "completion_tokens" in usage:
        trace.output_len = int(usage["completion_tokens"])
    else:
        n = count_tokens(trace.generated_text) if count_tokens else payload["max_tokens"]
        trace.output_len = n
    trace.usage_reported = "completion_tokens" in usage
    return trace
