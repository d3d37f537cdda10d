"""Structured output over HTTP on the demo bundle with DSpark speculation: 100 sampled
`response_format: json_schema` requests all parse and validate, with the accept length
reported; greedy output with the schema is the same with and without speculation."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import pytest

from specserve.config import SpecConfig

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z][a-z ]{0,11}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "language": {"enum": ["python", "c", "rust"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[a-z]{1,8}$"},
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "language", "tags"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
PROMPTS = ["Describe a programmer as JSON.", "def parse(self):", "NAME\n    ls - list"]

pytestmark = pytest.mark.skipif(not (DEMO / "dspark").is_dir(), reason="no demo bundle")


def _chat(url: str, prompt: str, **kw) -> dict:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "response_format": FORMAT,
        "max_tokens": 300,
        **kw,
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.fixture(scope="module")
def dspark(start_module_server):
    spec = SpecConfig("DSPARK", str(DEMO / "dspark"), verify_policy="full")
    return start_module_server(str(DEMO / "target"), spec=spec, max_total_tokens=65536)


def test_100_sampled_json_schema_outputs_validate(dspark):
    with ThreadPoolExecutor(16) as pool:
        choices = list(
            pool.map(
                lambda i: _chat(dspark.url, PROMPTS[i % 3], temperature=1.0, seed=i), range(100)
            )
        )
    valid = 0
    for c in choices:
        value = json.loads(c["message"]["content"])
        jsonschema.validate(value, SCHEMA)
        valid += c["finish_reason"] == "stop"
    assert valid == 100
    accept = [c["meta_info"]["spec_accept_length"] for c in choices]
    info = httpx.get(dspark.url + "/server_info").json()["internal_states"][0]
    print(
        f"accept length: server {info['avg_spec_accept_length']:.2f}, "
        f"per-request mean {sum(accept) / len(accept):.2f}"
    )
    assert info["avg_spec_accept_length"] > 1.0


def test_greedy_json_schema_identical_without_speculation(dspark, start_server):
    plain = start_server(str(DEMO / "target"), max_total_tokens=16384)
    for prompt in PROMPTS:
        want = _chat(plain.url, prompt, temperature=0)["message"]["content"]
        assert _chat(dspark.url, prompt, temperature=0)["message"]["content"] == want
        jsonschema.validate(json.loads(want), SCHEMA)
