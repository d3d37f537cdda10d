"""Issue 13: no request kills the engine, failures stay with their request, overload gets 429s,
every route but /health needs the key, internal errors are JSON with a request id."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

import specserve.engine.engine as engine_module
from specserve.config import SchedulerConfig
from specserve.server.api import ServerConfig


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    return err["message"]


def _text(r: httpx.Response, i: int = 0) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][i]["text"]


# -- the crash requests and validation at the edge ----------------------------------------------
def test_crash_requests_get_400_and_the_server_keeps_serving(server, client):
    for body in (
        {"prompt": "hi", "max_tokens": 4, "seed": 2**64},
        {"prompt": "hi", "max_tokens": 4, "seed": 2**64, "n": 2},
        {"prompt": "hi", "max_tokens": 4, "top_k": 2**63},
    ):
        msg = _error(client.post("/v1/completions", json=body), 400)
        assert ("seed" if "seed" in body else "top_k") in msg
    assert client.get("/health").status_code == 200
    assert _text(client.post("/v1/completions", json={"prompt": "alive", "max_tokens": 3}))


def test_seed_wraps_per_choice_and_top_k_beyond_vocab_keeps_all(client):
    sampled = {"prompt": "seeded", "max_tokens": 8, "temperature": 1.0, "ignore_eos": True}
    top = client.post("/v1/completions", json={**sampled, "seed": 2**64 - 1, "n": 2})
    zero = client.post("/v1/completions", json={**sampled, "seed": 0})
    assert _text(top, 1) == _text(zero)  # choice 1 of seed 2**64 - 1 uses seed 0
    plain = client.post("/v1/completions", json={**sampled, "seed": 7})
    wide = client.post("/v1/completions", json={**sampled, "seed": 7, "top_k": 10**6})
    assert _text(wide) == _text(plain)  # top_k beyond the vocabulary filters nothing
    assert _text(client.post("/v1/completions", json={**sampled, "seed": -(2**63)}))


_CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "route, body, needle",
    [
        ("completions", {"prompt": [[False]]}, "prompt"),
        ("completions", {"prompt": [True, 5]}, "prompt"),
        ("completions", {"prompt": "x", "n": True}, "n"),
        ("completions", {"prompt": "x", "n": 129}, "n must"),
        ("completions", {"prompt": "x", "best_of": 3}, "best_of"),
        ("completions", {"prompt": "x", "logprobs": 21}, "--max-logprobs"),
        ("completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ("completions", {"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty"),
        ("completions", {"prompt": "x", "top_k": -2}, "top_k"),
        ("completions", {"prompt": "x", "seed": 1.5}, "seed"),
        ("completions", {"prompt": "x", "seed": -(2**63) - 1}, "seed"),
        ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": "x", "stop_token_ids": [False]}, "stop_token_ids"),
        ("chat/completions", {**_CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
        ("chat/completions", {**_CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat/completions", {**_CHAT, "repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_out_of_range_values_are_400s_naming_them(client, route, body, needle):
    assert needle in _error(client.post(f"/v1/{route}", json=body), 400)


def test_nan_is_a_400(client):
    r = client.post(
        "/v1/completions",
        content=b'{"prompt": "x", "temperature": NaN}',
        headers={"content-type": "application/json"},
    )
    assert "temperature" in _error(r, 400)


# -- failure isolation ---------------------------------------------------------------------------
async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as ac:
        return await asyncio.gather(*(ac.post("/v1/completions", json=b) for b in bodies))


def _healthy(n: int) -> list[dict]:
    return [
        {"prompt": f"healthy {i}", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        for i in range(n)
    ]


def test_a_failing_sampler_fails_only_its_request(server, client, monkeypatch):
    want = [_text(client.post("/v1/completions", json=b)) for b in _healthy(3)]
    real = engine_module.probs_from_logits

    def poisoned(logits, params):
        if params[0].temperature == 0.77:
            raise RuntimeError("poisoned sampler (secret internals)")
        return real(logits, params)

    monkeypatch.setattr(engine_module, "probs_from_logits", poisoned)
    bad = {"prompt": "poison", "max_tokens": 24, "temperature": 0.77, "ignore_eos": True}
    *ok, failed = asyncio.run(_post_all(server.url, [*_healthy(3), bad]))
    assert [_text(r) for r in ok] == want
    msg = _error(failed, 500)
    assert failed.headers["x-request-id"] in msg and "secret" not in msg
    assert server.engine.snapshot.alive


def test_a_failure_while_appending_fails_only_its_stream(server, client, monkeypatch):
    want = [_text(client.post("/v1/completions", json=b)) for b in _healthy(2)]
    real = engine_module.LLMEngine._append

    def failing(self, req, tokens, logprobs):
        if req.params.temperature == 0.66 and len(req.output_token_ids) >= 5:
            raise RuntimeError("detokenizer bug")
        return real(self, req, tokens, logprobs)

    monkeypatch.setattr(engine_module.LLMEngine, "_append", failing)

    async def run() -> tuple[list[str], list[httpx.Response]]:
        bad = {"prompt": "bad", "max_tokens": 40, "temperature": 0.66, "stream": True}
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:

            async def stream() -> list[str]:
                async with ac.stream("POST", "/v1/completions", json=bad) as r:
                    return [line async for line in r.aiter_lines() if line]

            return await asyncio.gather(stream(), _post_all(server.url, _healthy(2)))

    events, ok = asyncio.run(run())
    assert [_text(r) for r in ok] == want
    errors = [json.loads(e[6:]) for e in events if e.startswith("data: {") and '"error"' in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == 500
    assert events[-1] == "data: [DONE]"


def test_a_step_failure_that_cannot_be_narrowed_fails_that_step_only(server, client):
    eng = server.engine.engine
    real, calls = eng.runner.forward, []

    def forward_once_broken(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("device error")
        return real(batch)

    eng.runner.forward = forward_once_broken
    try:
        failed = client.post("/v1/completions", json={"prompt": "unlucky", "max_tokens": 4})
        assert "request id" in _error(failed, 500)
        after = client.post("/v1/completions", json={"prompt": "lucky", "max_tokens": 4})
        assert _text(after) is not None
    finally:
        del eng.runner.forward
    assert "specserve:num_step_errors_total" in client.get("/metrics").text


def test_a_dead_engine_loop_is_reported(tiny_model_path, start_server):
    s = start_server(tiny_model_path, max_total_tokens=1024)
    reasons: list[str] = []
    died = threading.Event()
    s.engine.on_death = lambda reason: (reasons.append(reason), died.set())

    def broken() -> bool:
        raise RuntimeError("loop bug")

    s.engine.engine.has_unfinished = broken
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert "died" in _error(r, 503)
    assert died.wait(5) and "loop bug" in reasons[0]
    assert "loop bug" in _error(httpx.get(s.url + "/health"), 503)
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
    assert "not running" in _error(r, 503)


# -- admission control ---------------------------------------------------------------------------
_LONG = {"prompt": "long", "max_tokens": 1500, "ignore_eos": True, "stream": True}


def test_overload_gets_429_and_queued_streams_get_headers_at_once(tiny_model_path, start_server):
    s = start_server(
        tiny_model_path,
        max_total_tokens=4096,
        scheduler=SchedulerConfig(max_running_requests=1, max_queued_requests=2),
    )
    eng = s.engine.engine

    async def run() -> None:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as ac:
            async with ac.stream("POST", "/v1/completions", json=_LONG) as running:
                lines = running.aiter_lines()
                assert (await anext(lines)).startswith("data: ")  # now running, not queued
                t0 = time.monotonic()
                async with ac.stream("POST", "/v1/completions", json=_LONG) as queued:
                    assert queued.status_code == 200
                    async with ac.stream("POST", "/v1/completions", json=_LONG) as queued2:
                        assert queued2.status_code == 200
                        assert time.monotonic() - t0 < 5  # headers before any token
                        full = await ac.post("/v1/completions", json={"prompt": "x"})
                        assert "--max-queued-requests" in _error(full, 429)
                        assert int(full.headers["retry-after"]) >= 1
                        many = {"prompt": ["a", "b"], "n": 2}
                        assert "n × prompts" in _error(
                            await ac.post("/v1/completions", json=many), 400
                        )
                    # the client of queued2 left: its request is aborted before any prefill
                    deadline = time.monotonic() + 5
                    while s.engine.snapshot.num_waiting != 1:
                        assert time.monotonic() < deadline, s.engine.snapshot
                        await asyncio.sleep(0.02)

    prompt_tokens = eng.stats.prompt_tokens
    asyncio.run(run())
    # only the running request's prompt was processed
    assert eng.stats.prompt_tokens - prompt_tokens == len(eng.tokenizer.encode(_LONG["prompt"]))


def test_queue_timeout_is_a_503(tiny_model_path, start_server):
    s = start_server(
        tiny_model_path,
        max_total_tokens=4096,
        scheduler=SchedulerConfig(max_running_requests=1),
        server=ServerConfig("tiny", queue_timeout=0.5),
    )

    async def run() -> None:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as ac:
            async with ac.stream("POST", "/v1/completions", json=_LONG) as running:
                lines = running.aiter_lines()  # kept: a collected iterator closes the stream
                assert (await anext(lines)).startswith("data: ")
                r = await ac.post("/v1/completions", json={"prompt": "late", "max_tokens": 2})
                assert "--queue-timeout" in _error(r, 503)
                async with ac.stream("POST", "/v1/completions", json=_LONG) as late:
                    events = [line async for line in late.aiter_lines() if line]
                assert "--queue-timeout" in events[0] and events[-1] == "data: [DONE]"

    asyncio.run(run())


# -- API key, OpenAPI, the catch-all handler -------------------------------------------------------
def test_every_route_but_health_needs_the_key(keyed):
    schema = keyed.app.openapi()  # every API route, including ones added by other routers
    paths = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    assert {("GET", "/metrics"), ("GET", "/get_server_info"), ("GET", "/boom")} <= paths
    paths |= {("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/no/such/route")}
    for method, path in sorted(paths):
        r = httpx.request(method, keyed.url + path)
        if path == "/health":
            assert r.status_code == 200
            continue
        assert _error(r, 401) and r.headers["www-authenticate"] == "Bearer", (method, path)
        r = httpx.request(method, keyed.url + path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, (method, path)
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = httpx.get(keyed.url + "/v1/models", headers={"Authorization": f"{scheme} sekrit"})
        assert r.status_code == 200
    assert httpx.get(keyed.url + "/openapi.json", headers={"Authorization": "Bearer sekrit"})


def test_internal_errors_are_json_500s_with_the_request_id(keyed):
    auth = {"Authorization": "Bearer sekrit"}
    r = httpx.get(keyed.url + "/boom", headers=auth)
    msg = _error(r, 500)
    assert r.headers["x-request-id"] in msg and "secret" not in msg
    r = httpx.get(keyed.url + "/boom", headers={**auth, "X-Request-Id": "trace-42"})
    assert "trace-42" in _error(r, 500)


def test_docs_can_be_turned_off(tiny_model_path, start_server):
    s = start_server(
        tiny_model_path, max_total_tokens=1024, server=ServerConfig("tiny", disable_docs=True)
    )
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert _error(httpx.get(s.url + path), 404)
    assert httpx.get(s.url + "/v1/models").status_code == 200


def test_openapi_documents_400s_and_response_models(server):
    schema = TestClient(server.app).get("/openapi.json").json()
    for path, model in (
        ("/v1/completions", "CompletionResponse"),
        ("/v1/chat/completions", "ChatCompletionResponse"),
    ):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse"
        )
        ok = responses["200"]["content"]
        assert ok["application/json"]["schema"]["$ref"].endswith("/" + model)
        assert "text/event-stream" in ok
    assert "HTTPValidationError" not in json.dumps(schema)
