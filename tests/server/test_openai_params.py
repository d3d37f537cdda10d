"""Every parameter of the OpenAI completions and chat schemas (as the `openai` SDK declares
them) is either implemented or a 400 naming it: none is accepted and ignored."""

from __future__ import annotations

import json
import typing

import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from specserve.engine.tokenizer import ChatTemplateError, Tokenizer
from specserve.train.tokenizer import save_tokenizer

# parameter -> a value that exercises it; each is implemented (the request succeeds)
IMPLEMENTED_COMPLETION = {
    "model": "tiny",
    "prompt": "hello",
    "echo": True,
    "frequency_penalty": 0.5,
    "logit_bias": {"7": 1.5},
    "logprobs": 2,
    "max_tokens": 3,
    "n": 2,
    "presence_penalty": 0.5,
    "seed": 3,
    "stop": ["\n\n"],
    "stream": False,
    "stream_options": None,  # only with stream (below)
    "temperature": 0.7,
    "top_p": 0.9,
    "user": "u-1",
    "best_of": 1,
    "suffix": None,
}
IMPLEMENTED_CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "hi"}],
    "frequency_penalty": 0.5,
    "logit_bias": {"7": -1.0},
    "logprobs": True,
    "top_logprobs": 2,
    "max_completion_tokens": 3,
    "max_tokens": 3,
    "n": 2,
    "presence_penalty": 0.5,
    "seed": 3,
    "stop": "\n\n",
    "stream": False,
    "stream_options": None,
    "temperature": 0.7,
    "top_p": 0.9,
    "user": "u-1",
    "safety_identifier": "s-1",
    "prompt_cache_key": "k-1",
    "modalities": ["text"],
    "response_format": {"type": "json_object"},
    "service_tier": "auto",
    "store": False,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "none",
    "parallel_tool_calls": True,
}
# parameter -> a value this server does not implement: a 400 whose param names it
REJECTED_COMPLETION = {"best_of": 2, "suffix": "})"}
REJECTED_CHAT = {
    "audio": {"voice": "alloy", "format": "wav"},
    "function_call": "auto",
    "functions": [{"name": "f", "parameters": {}}],
    "metadata": {"k": "v"},
    "modalities": ["text", "audio"],
    "moderation": {"model": "omni"},
    "prediction": {"type": "content", "content": "x"},
    "prompt_cache_options": {"mode": "x"},
    "prompt_cache_retention": "24h",
    "reasoning_effort": "high",
    "response_format": {"type": "structural_tag"},
    "service_tier": "flex",
    "store": True,
    "verbosity": "low",
    "web_search_options": {},
}


def _schema(module) -> set[str]:
    return set(typing.get_type_hints(module.CompletionCreateParamsBase)) | {"stream"}


def test_every_sdk_parameter_is_classified():
    """A parameter the SDK adds later fails here until it is implemented or rejected."""
    assert _schema(completion_create_params) == set(IMPLEMENTED_COMPLETION)
    assert _schema(chat_create_params) <= set(IMPLEMENTED_CHAT) | set(REJECTED_CHAT)
    assert _schema(chat_create_params) >= set(IMPLEMENTED_CHAT)


def test_implemented_parameters_are_accepted(client):
    r = client.post("/v1/completions", json=IMPLEMENTED_COMPLETION)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2
    r = client.post("/v1/chat/completions", json=IMPLEMENTED_CHAT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][1]["logprobs"]["content"]


@pytest.mark.parametrize(
    "route, name, value",
    [("/v1/completions", k, v) for k, v in REJECTED_COMPLETION.items()]
    + [("/v1/chat/completions", k, v) for k, v in REJECTED_CHAT.items()],
)
def test_unimplemented_values_are_a_400_naming_them(client, route, name, value):
    base = IMPLEMENTED_COMPLETION if route == "/v1/completions" else IMPLEMENTED_CHAT
    r = client.post(route, json={**base, name: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == name and name in err["message"]


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema", "json_schema": 5},  # once a 500 (found by the fuzz)
        {"type": "json_schema", "json_schema": {"schema": "{}"}},
        {"type": "json_schema"},
        {"type": 7},
    ],
)
def test_malformed_response_format_is_a_400(client, fmt):
    r = client.post("/v1/chat/completions", json={**IMPLEMENTED_CHAT, "response_format": fmt})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format", r.text


def test_logit_bias_steers_greedy_output(client):
    body = {"prompt": "x", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = client.post("/v1/completions", json={**body, "logprobs": 0}).json()
    first = plain["choices"][0]["logprobs"]["tokens"][0]
    forced = client.post(
        "/v1/completions", json={**body, "logit_bias": {"300": 100}, "logprobs": 0}
    ).json()
    tokens = forced["choices"][0]["logprobs"]["tokens"]
    assert len(set(tokens)) == 1 and tokens[0] != first
    for bad, needle in (
        ({"x": 1}, "token ids"),
        ({"²": 1}, "token ids"),  # a digit to str.isdigit, not to int()
        ({"100000": 1}, "logit_bias"),
        ({"5": 500}, "[-100"),
    ):
        r = client.post("/v1/completions", json={**body, "logit_bias": bad})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_continuous_usage_stats(client):
    body = {
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 5,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    counted = [e["usage"]["completion_tokens"] for e in events if e["choices"] and "usage" in e]
    assert counted == sorted(counted) and counted[-1] == 5 and len(counted) >= 2
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5


def test_assistant_tool_calls_in_history(client, tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "2"},
    ]
    r = client.post("/tokenize", json={"messages": messages, "return_token_strs": True})
    assert '{"name": "f", "arguments": {"a": 1}}' in "".join(r.json()["token_strs"])
    bad = [
        *messages[:1],
        {**messages[1], "tool_calls": [{**call, "function": {"name": "f", "arguments": "{"}}]},
    ]
    r = client.post("/v1/chat/completions", json={"messages": bad, "max_tokens": 2})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    # a template that cannot show them is a 400, not a silently shortened history
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    save_tokenizer(tmp_path, 300, chat_template=plain)
    with pytest.raises(ChatTemplateError, match="tool_calls"):
        Tokenizer(tmp_path).apply_chat_template(messages)
    with pytest.raises(ChatTemplateError, match="tools"):
        Tokenizer(tmp_path).apply_chat_template(messages[:1], tools=[{"type": "function"}])
