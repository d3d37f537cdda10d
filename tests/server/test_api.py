"""The HTTP API: OpenAI client compatibility, streaming, concurrency, errors, disconnects."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import openai
import pytest

from specserve.llm import LLM


def test_openai_client_completions_chat_streaming(server, client):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(
        model="tiny",
        prompt="hello world",
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.choices[0].finish_reason in ("length", "stop")
    chat = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    stream = list(
        c.completions.create(
            model="tiny",
            prompt="hello world",
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(s.choices[0].text for s in stream) == r.choices[0].text


def test_32_concurrent_streams_match_single_runs(server, tiny_model_path, client):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(2, 80))] for _ in range(32)]
    lens = [rng.randint(1, 40) for _ in range(32)]
    llm = LLM(tiny_model_path, max_total_tokens=4096, page_size=8)
    want = []
    for p, n in zip(prompts, lens, strict=True):
        from specserve.core import SamplingParams

        out = llm.generate(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        want.append(out[0].outputs[0].text)

    async def one(ac, p, n):
        body = {
            "model": "tiny",
            "prompt": p,
            "max_tokens": n,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        text = ""
        async with ac.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def run_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            return await asyncio.gather(
                *(one(ac, p, n) for p, n in zip(prompts, lens, strict=True))
            )

    got = asyncio.run(run_all())
    assert got == want


def test_n_choices_and_batch_prompts(client):
    r = client.post(
        "/v1/completions",
        json={
            "prompt": ["a b", "c d e"],
            "max_tokens": 3,
            "n": 2,
            "temperature": 1.0,
            "seed": 3,
            "ignore_eos": True,
        },
    )
    body = r.json()
    assert r.status_code == 200 and len(body["choices"]) == 4
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 12


def test_logprobs_in_completions_and_chat(client):
    r = client.post(
        "/v1/completions", json={"prompt": "x y", "max_tokens": 2, "logprobs": 3, "temperature": 0}
    ).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 2 and len(lp["top_logprobs"][0]) <= 3
    r = client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2,
            "logprobs": True,
            "top_logprobs": 2,
            "temperature": 0,
        },
    ).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and len(content[0]["top_logprobs"]) == 2


def test_health_metrics_server_info(client):
    assert client.get("/health").status_code == 200
    client.post("/v1/completions", json={"prompt": "metrics", "max_tokens": 4, "ignore_eos": True})
    m = client.get("/metrics").text
    for name in (
        "specserve:num_requests_running",
        "specserve:kv_cache_usage_perc",
        "specserve:generation_tokens_total",
        "specserve:time_to_first_token_seconds",
        "specserve:e2e_request_latency_seconds",
        "specserve:inter_token_latency_seconds",
        "specserve:request_success_total",
    ):
        assert name in m
    info = client.get("/get_server_info").json()
    assert info["internal_states"][0]["avg_spec_accept_length"] == 1.0
    assert info["kv_cache_dtype"] == "auto"


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "type" in err
    return err["message"]


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10**9}, "context length"),
        ({"prompt": "x", "temperature": -0.5}, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": ""}, "empty"),
        ({"prompt": []}, "empty"),
        ({"prompt": [10**7]}, "token ids"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "x", "n": 0}, "n must"),
        ({"prompt": "x" * 3000, "max_tokens": 1}, "context length"),
    ],
)
def test_bad_completion_requests(client, body, needle):
    assert needle in _error(client.post("/v1/completions", json=body), 400)


def test_malformed_json_unknown_model_and_chat_errors(client):
    r = client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert "JSON" in _error(r, 400)
    assert "does not exist" in _error(
        client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404
    )
    assert "messages" in _error(client.post("/v1/chat/completions", json={"messages": []}), 400)
    assert _error(
        client.post(
            "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}
        ),
        400,
    )
    # the server still serves afterwards
    ok = client.post("/v1/completions", json={"prompt": "still alive", "max_tokens": 2})
    assert ok.status_code == 200


def test_chat_without_template_is_a_clear_400(tmp_path, start_server):
    from specserve.testing.tiny import make_checkpoint
    from specserve.train.tokenizer import save_tokenizer

    path = make_checkpoint(tmp_path / "m")
    save_tokenizer(path, 512, chat_template=None)
    s = start_server(str(path), max_total_tokens=1024)
    r = httpx.post(
        s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert "chat template" in _error(r, 400)


def test_client_disconnect_mid_stream_frees_slot(server, client):
    eng = server.engine.engine
    aborted, generated = eng.stats.num_aborted, eng.stats.generation_tokens
    body = {"prompt": "a long one", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i > 3:
                break  # leave the context: the connection closes mid-stream
    server.wait_idle()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert eng.stats.num_aborted == aborted + 1
    assert eng.stats.generation_tokens - generated < 1500


def test_non_streaming_disconnect_aborts(server, client):
    eng = server.engine.engine
    aborted = eng.stats.num_aborted
    with pytest.raises(httpx.ReadTimeout):
        client.post(
            "/v1/completions",
            json={"prompt": "slow", "max_tokens": 1800, "ignore_eos": True},
            timeout=0.5,
        )
    server.wait_idle()
    assert eng.stats.num_aborted == aborted + 1


def test_api_key_enforced(tiny_model_path, start_server):
    s = start_server(tiny_model_path, api_key="sekrit", max_total_tokens=1024)
    r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert _error(r, 401)
    r = httpx.post(
        s.url + "/v1/completions",
        json={"prompt": "x", "max_tokens": 1},
        headers={"Authorization": "Bearer wrong"},
    )
    assert _error(r, 401)
    r = httpx.post(
        s.url + "/v1/completions",
        json={"prompt": "x", "max_tokens": 1},
        headers={"Authorization": "Bearer sekrit"},
    )
    assert r.status_code == 200
    assert httpx.get(s.url + "/health").status_code == 200  # health stays open
