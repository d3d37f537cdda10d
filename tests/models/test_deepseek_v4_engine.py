"""DeepSeek-V4 through the engine and the OpenAI server on the issue-16 tiny checkpoint."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest
import torch
import transformers
import uvicorn

from specserve.cli import build_parser
from specserve.config import ConfigError
from specserve.core import SamplingParams
from specserve.engine.model_runner import kv_bytes_per_token
from specserve.llm import LLM
from specserve.ports import free_port
from specserve.server.api import ServerConfig, create_app
from specserve.server.async_engine import AsyncEngine
from specserve.server.cli import build_engine


def _hf_greedy(path: str, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by transformers' full forward (no cache) at every step."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(ref(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_llm_greedy_equals_transformers(tiny_v4_path, caplog):
    """Three prompts of different lengths batched together, prefill chunked at 16 tokens, 30
    greedy tokens each (across several compression windows); prefix caching is refused."""
    prompts = [
        torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        for n in (5, 23, 38)
    ]
    with caplog.at_level(logging.INFO, logger="specserve.engine"):
        llm = LLM(tiny_v4_path, max_total_tokens=1024, page_size=8, chunked_prefill_size=16)
    assert "prefix caching is off" in caplog.text
    assert not llm.engine.block_manager.enable_prefix_caching
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == _hf_greedy(tiny_v4_path, prompt, 30)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_cache_accounting_counts_compressed_entries(tiny_v4_path):
    from specserve.config import ModelConfig

    cfg = ModelConfig.from_pretrained(tiny_v4_path)
    # CSA layers 1, 3: (64 + 32) / 4 each; HCA layer 2: 64 / 8; window-only layer 0: nothing
    assert kv_bytes_per_token(cfg, torch.float32) == int((2 * 96 / 4 + 64 / 8) * 4)


@pytest.fixture(scope="module")
def server(tiny_v4_path):
    """The engine `specserve serve` builds from its flags, behind the OpenAI app."""
    args = build_parser().parse_args(
        ["serve", "--model-path", tiny_v4_path, "--page-size", "8", "--max-total-tokens", "2048"]
    )
    engine = AsyncEngine(build_engine(args)[0])
    engine.start()
    port = free_port()
    app = create_app(engine, ServerConfig("dsv4"))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()


def test_server_answers_openai_requests(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 12})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        chat = c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["role"] == "assistant"
        bad = c.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400 and "error" in bad.json()


def test_preemption_recomputes_the_state(tiny_v4_path):
    """With KV blocks for fewer tokens than the batch needs, requests are preempted and
    recomputed from position 0 (a fresh state); outputs equal an unconstrained run."""
    prompts = [list(range(10 + i, 30 + i)) for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = LLM(tiny_v4_path, max_total_tokens=1024, page_size=8)
    tight = LLM(tiny_v4_path, max_total_tokens=96, page_size=8)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == want


def test_a_16_bit_kv_cache_is_refused(tiny_v4_path):
    """Its compressed per-request state keeps the model's dtype: say so rather than ignore it."""
    with pytest.raises(ConfigError, match="--kv-cache-dtype bfloat16: .* keeps its own"):
        LLM(tiny_v4_path, max_total_tokens=1024, page_size=8, kv_cache_dtype="bfloat16")


def test_finished_requests_leave_no_state(tiny_v4_path):
    llm = LLM(tiny_v4_path, max_total_tokens=1024, page_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    llm.generate([[5, 6, 7], list(range(40, 60))], params)
    assert len(llm.engine.runner.states) == 2  # nothing has run since they finished
    llm.generate([[9, 10]], params)
    assert len(llm.engine.runner.states) == 1  # the finished ones were dropped
