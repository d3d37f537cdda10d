"""Multi-turn chat over HTTP on the demo bundle with DSpark: the second turn's prompt repeats
the first turn, so it is served from the prefix cache (`usage.prompt_tokens_details`), and its
greedy reply is the same as a plain server's."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from specserve.config import SpecConfig

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"
SYSTEM = "You are a careful Python reviewer. " * 12

pytestmark = pytest.mark.skipif(not (DEMO / "dspark").is_dir(), reason="no demo bundle")


def _chat(url: str, messages: list[dict]) -> dict:
    body = {"messages": messages, "max_tokens": 24, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _two_turns(url: str) -> tuple[dict, dict]:
    first = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "def parse(self, text):"},
    ]
    one = _chat(url, first)
    reply = {"role": "assistant", "content": one["choices"][0]["message"]["content"]}
    two = _chat(url, [*first, reply, {"role": "user", "content": "And the tests?"}])
    return one, two


def test_second_turn_hits_the_prefix_cache_with_dspark(start_server):
    spec = SpecConfig("DSPARK", str(DEMO / "dspark"), verify_policy="full")
    dspark = start_server(str(DEMO / "target"), spec=spec, max_total_tokens=8192)
    plain = start_server(str(DEMO / "target"), max_total_tokens=8192)
    got, want = _two_turns(dspark.url), _two_turns(plain.url)
    for g, w in zip(got, want, strict=True):
        assert g["choices"][0]["message"]["content"] == w["choices"][0]["message"]["content"]
    cached = got[1]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= got[0]["usage"]["prompt_tokens"] // 16 * 16 - 16 > 0
    assert got[1]["choices"][0]["meta_info"]["spec_draft_token_num"] > 0
    metrics = httpx.get(dspark.url + "/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith("specserve:prefix_cache_hits")]
    assert hits and float(hits[0].split()[-1]) == cached
