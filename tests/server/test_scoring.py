"""Scoring through /v1/completions as lm-eval sends it: `echo` with prompt logprobs equal to
`transformers`' log-softmax, `max_tokens: 0`, `text_offset`, with and without speculation."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
import transformers

from specserve.config import SpecConfig

CONTEXT, CONTINUATION = "def parse(self, text):", " return text"


@pytest.fixture(scope="module")
def hf(tiny_model_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model_path, dtype=torch.float32
    ).eval()


def _hf_logprobs(hf, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def _prompt_ids(server) -> list[int]:
    return server.engine.engine.tokenizer.encode(CONTEXT + CONTINUATION)


@pytest.mark.parametrize("algorithm", ["NONE", "NGRAM"])
def test_lm_eval_loglikelihood_request(algorithm, server, start_server, tiny_model_path, hf):
    """lm-eval's body; it reads token_logprobs[ctxlen:-1] (the last entry is the generated
    token)."""
    srv = server
    if algorithm != "NONE":
        srv = start_server(tiny_model_path, spec=SpecConfig(algorithm), max_total_tokens=4096)
    ids = _prompt_ids(srv)
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        body = {
            "prompt": ids,
            "max_tokens": 1,
            "logprobs": 1,
            "echo": True,
            "temperature": 0,
            "seed": 1234,
        }
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = _hf_logprobs(hf, ids)
    got = lp["token_logprobs"][1 : len(ids)]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4
    # the top entry is the greedy choice; the generated token follows the prompt
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
    tok = srv.engine.engine.tokenizer
    assert choice["text"].startswith(tok.decode(ids, skip_special_tokens=False))
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert [choice["text"][a:b] for a, b in zip(offsets, offsets[1:], strict=False)] == lp[
        "tokens"
    ][:-1]
    assert srv.engine.engine.stats.num_draft_tokens == 0  # scoring never drafts


def test_max_tokens_zero_scores_only(server, client, hf):
    text = CONTEXT + CONTINUATION
    r = client.post(
        "/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 2}
    ).json()
    choice = r["choices"][0]
    assert choice["text"] == text
    ids = _prompt_ids(server)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and r["usage"]["completion_tokens"] == 0
    want = _hf_logprobs(hf, ids)
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], want, strict=True)) <= 1e-4
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_echo_without_logprobs_and_offsets_without_echo(client):
    plain = client.post(
        "/v1/completions", json={"prompt": "abc", "max_tokens": 3, "temperature": 0}
    ).json()["choices"][0]["text"]
    echo = client.post(
        "/v1/completions", json={"prompt": "abc", "max_tokens": 3, "temperature": 0, "echo": True}
    ).json()["choices"][0]
    assert echo["text"] == "abc" + plain and echo["logprobs"] is None
    lp = client.post(
        "/v1/completions", json={"prompt": "abc", "max_tokens": 3, "temperature": 0, "logprobs": 0}
    ).json()["choices"][0]["logprobs"]
    assert lp["text_offset"][0] == 3  # after the prompt, as OpenAI counts


def test_streamed_echo_equals_full(client):
    body = {"prompt": "import os", "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 1}
    full = client.post("/v1/completions", json=body).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == full["text"]
    tokens = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"]]
    offsets = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["text_offset"]]
    assert tokens == full["logprobs"]["tokens"] and offsets == full["logprobs"]["text_offset"]
