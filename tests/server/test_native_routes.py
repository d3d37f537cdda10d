"""SGLang's native routes and vLLM's tokenizer routes, in the shapes their clients read."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from specserve import __version__
from specserve.config import SchedulerConfig, SpecConfig
from specserve.server.api import ServerConfig


def _sse(r) -> list[dict]:
    lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_generate_text_and_ids_match_completions(client, server):
    sp = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    r = client.post("/generate", json={"text": "def f(x):", "sampling_params": sp})
    assert r.status_code == 200, r.text
    body = r.json()
    want = client.post(
        "/v1/completions",
        json={"prompt": "def f(x):", "max_tokens": 6, "temperature": 0, "ignore_eos": True},
    ).json()["choices"][0]["text"]
    assert body["text"] == want and len(body["output_ids"]) == 6
    meta = body["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["completion_tokens"] == 6 and meta["prompt_tokens"] > 0
    assert meta["e2e_latency"] > 0 and "spec_verify_ct" in meta
    ids = server.engine.engine.tokenizer.encode("def f(x):")
    by_ids = client.post("/generate", json={"input_ids": ids, "sampling_params": sp}).json()
    assert by_ids["output_ids"] == body["output_ids"]


def test_generate_stream_is_cumulative_like_sglang(client):
    """bench_serving's sglang backend reads the cumulative `text` and
    `meta_info.completion_tokens` of each chunk."""
    sp = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    full = client.post("/generate", json={"text": "import", "sampling_params": sp}).json()
    with client.stream(
        "POST", "/generate", json={"text": "import", "sampling_params": sp, "stream": True}
    ) as r:
        chunks = _sse(r)
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert texts[-1] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    counts = [c["meta_info"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 8
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_generate_logprobs_and_batch(client):
    body = {
        "text": ["a b c d", "x"],
        "sampling_params": {"temperature": 0, "max_new_tokens": 3},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 2,
        "return_text_in_logprobs": True,
    }
    out = client.post("/generate", json=body).json()
    assert isinstance(out, list) and len(out) == 2
    meta = out[0]["meta_info"]
    assert len(meta["output_token_logprobs"]) == len(out[0]["output_ids"])
    lp, tok, text = meta["output_token_logprobs"][0]
    assert tok == out[0]["output_ids"][0] and isinstance(text, str) and lp <= 0
    assert meta["output_top_logprobs"][0][0][1] == tok  # greedy: the top token
    first = meta["input_token_logprobs"][0]
    assert first[0] is None and len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    comp = client.post(
        "/v1/completions",
        json={"prompt": "a b c d", "max_tokens": 0, "echo": True, "logprobs": 0},
    ).json()["choices"][0]["logprobs"]["token_logprobs"]
    got = [x[0] for x in meta["input_token_logprobs"]]
    assert got[1:] == pytest.approx(comp[1:], abs=1e-6)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"sampling_params": {"max_new_tokens": 2}}, None),
        ({"text": "x", "input_ids": [1]}, None),
        ({"text": "x", "sampling_params": {"frobnicate": 1}}, "sampling_params.frobnicate"),
        ({"text": "x", "sampling_params": {"regex": "a(("}}, None),
        ({"text": "x", "sampling_params": {"regex": "a", "ebnf": "root ::= x"}}, None),
        ({"text": "x", "sampling_params": {"temperature": -1}}, None),
        ({"text": "x", "lora_path": "adapter"}, "lora_path"),
        ({"text": ["x", "y"], "stream": True}, "stream"),
    ],
)
def test_generate_bad_requests(client, body, param):
    r = client.post("/generate", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] and (param is None or err["param"] == param)


def test_info_routes(client, server):
    info = client.get("/server_info").json()
    assert info == client.get("/get_server_info").json()
    assert "avg_spec_accept_length" in info["internal_states"][0]
    model = client.get("/get_model_info").json()
    assert model["is_generation"] is True and model["model_type"] == "qwen3"
    assert client.get("/version").json() == {"version": __version__}
    assert client.get("/health_generate").status_code == 200
    card = client.get("/v1/models/tiny").json()
    assert card == client.get("/v1/models").json()["data"][0]
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_flush_cache_forgets_prefixes(client, server):
    prompt = {"text": "x " * 40, "sampling_params": {"max_new_tokens": 1}}
    client.post("/generate", json=prompt)
    again = client.post("/generate", json=prompt).json()["meta_info"]
    assert again["cached_tokens"] > 0
    assert client.post("/flush_cache").status_code == 200
    after = client.post("/generate", json=prompt).json()["meta_info"]
    assert after["cached_tokens"] == 0


def test_tokenize_detokenize(client, server):
    tok = server.engine.engine.tokenizer
    r = client.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("hello world") and r["count"] == len(r["tokens"])
    assert "".join(r["token_strs"]) == "hello world" and r["max_model_len"] > 0
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.json()["tokens"] == tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    )
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {
        "prompt": "hello world"
    }
    assert client.post("/detokenize", json={"tokens": [10**7]}).status_code == 400
    assert client.post("/tokenize", json={}).status_code == 400


def test_spec_accept_length_and_vllm_metric_names(start_server, tiny_model_path):
    srv = start_server(tiny_model_path, spec=SpecConfig("NGRAM"), max_total_tokens=4096)
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        sp = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
        meta = c.post("/generate", json={"text": "a a a a a a a a", "sampling_params": sp}).json()[
            "meta_info"
        ]
        metrics = c.get("/metrics").text
        info = c.get("/server_info").json()
    assert meta["spec_accept_length"] >= 1.0 and meta["spec_draft_token_num"] > 0
    assert info["internal_states"][0]["avg_spec_accept_length"] > 1.0
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        ours = [
            x for x in metrics.splitlines() if x.startswith(f"specserve:spec_decode_{name}_total")
        ]
        vllm = [x for x in metrics.splitlines() if x.startswith(f"vllm:spec_decode_{name}_total")]
        assert ours and [x.split()[-1] for x in ours] == [x.split()[-1] for x in vllm]


# -- the native routes under the OpenAI routes' rules (admission, caps, a dead loop) -------------
def test_generate_obeys_admission_and_the_logprob_cap(tiny_model_path, start_server):
    s = start_server(
        tiny_model_path,
        max_total_tokens=1024,
        scheduler=SchedulerConfig(max_queued_requests=2),
        server=ServerConfig("tiny", max_logprobs=3),
    )
    sp = {"max_new_tokens": 2, "n": 3}
    r = httpx.post(s.url + "/generate", json={"text": "x", "sampling_params": sp}, timeout=30)
    assert r.status_code == 400 and "--max-queued-requests" in r.json()["error"]["message"]
    body = {"text": "x", "return_logprob": True, "top_logprobs_num": 4}
    r = httpx.post(s.url + "/generate", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs_num"
    body["top_logprobs_num"] = 3
    assert httpx.post(s.url + "/generate", json=body, timeout=30).status_code == 200


def test_a_bad_grammar_is_a_400_before_any_stream(client):
    for route, body in (
        ("/generate", {"text": "x", "stream": True, "sampling_params": {"regex": "a(("}}),
        ("/v1/completions", {"prompt": "x", "stream": True, "regex": "a(("}),
    ):
        r = client.post(route, json=body)
        assert r.status_code == 400 and "regex" in r.json()["error"]["message"], r.text


def test_native_routes_report_a_dead_engine_loop_as_503(tiny_model_path, start_server):
    s = start_server(tiny_model_path, max_total_tokens=1024)
    died = threading.Event()
    s.engine.on_death = lambda reason: died.set()

    def broken() -> bool:
        raise RuntimeError("loop bug")

    s.engine.engine.has_unfinished = broken
    httpx.post(s.url + "/generate", json={"text": "x"}, timeout=30)  # wakes the loop: it dies
    assert died.wait(5)
    for method, path, body in (
        ("POST", "/generate", {"text": "x"}),
        ("POST", "/flush_cache", None),
        ("GET", "/health_generate", None),
    ):
        r = httpx.request(method, s.url + path, json=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", (path, r.text)


def test_call_runs_on_the_engine_thread_and_raises_its_errors(server):
    async def run() -> None:
        name = await server.engine.call(lambda: threading.current_thread().name)
        assert name == "engine-loop"
        with pytest.raises(ZeroDivisionError):
            await server.engine.call(lambda: 1 / 0)

    asyncio.run(run())
