"""Tool calls: the chat template renders tools and tool history, `required` and named
choices are forced through the grammar, `tool_calls` come back whole and streamed, and a
round trip with the openai SDK works."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import transformers

from specserve.engine.tokenizer import Tokenizer
from specserve.server.tool_parser import StreamingToolParser, parse_tool_calls

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["a"],
                "additionalProperties": False,
            },
        },
    },
]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def test_round_trip_with_the_openai_sdk(server, client):
    c = _client(server)
    r = c.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=120, seed=1
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "add")
    json.loads(call.function.arguments)  # valid JSON arguments
    history = [
        *USER,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    answer = c.chat.completions.create(
        model="tiny", messages=history, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert answer.choices[0].message.tool_calls is None
    assert isinstance(answer.choices[0].message.content, str)
    rendered = client.post("/tokenize", json={"messages": history, "return_token_strs": True})
    text = "".join(rendered.json()["token_strs"])
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    assert f'"name": "{call.function.name}"' in text


def test_named_choice_streams_tool_call_deltas(server):
    c = _client(server)
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = c.chat.completions.create(
        model="tiny",
        messages=USER,
        tools=TOOLS,
        tool_choice=named,
        max_tokens=120,
        stream=True,
        temperature=0,
    )
    chunks = list(stream)
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    full = c.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, tool_choice=named, max_tokens=120, temperature=0
    )
    assert full.choices[0].message.tool_calls[0].function.arguments == calls[0].function.arguments


@pytest.mark.parametrize("seed", range(5))
def test_required_calls_validate(server, seed):
    r = _client(server).chat.completions.create(
        model="tiny",
        messages=USER,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=200,
        seed=seed,
        parallel_tool_calls=False,
    )
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(calls[0].function.arguments), schema[calls[0].function.name])


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"tool_choice": "required", "tools": None}, "needs tools"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "excludes"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
    ],
)
def test_bad_tool_requests(client, extra, needle):
    body = {"messages": USER, "tools": TOOLS, "max_tokens": 4, **extra}
    body = {k: v for k, v in body.items() if v is not None}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_auto_needs_a_parser(start_server, tiny_model_path):
    srv = start_server(tiny_model_path, tool_call_parser=None, max_total_tokens=2048)
    import httpx

    r = httpx.post(
        srv.url + "/v1/chat/completions", json={"messages": USER, "tools": TOOLS}, timeout=60
    )
    assert r.status_code == 400 and "--tool-call-parser" in r.json()["error"]["message"]


def test_template_renders_tools_as_transformers_does(tiny_model_path):
    history = [
        {"role": "system", "content": "Be brief."},
        *USER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    ours = Tokenizer(tiny_model_path).apply_chat_template(history, True, TOOLS)
    hf = transformers.AutoTokenizer.from_pretrained(tiny_model_path)
    want = hf.apply_chat_template(history, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert ours == want
    assert "<tools>\n" + json.dumps(TOOLS[0]) in ours


def test_parsers():
    text = 'Let me check. <tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    content, calls = parse_tool_calls(text + "<tool_call>not json</tool_call>")
    assert content == "Let me check. <tool_call>not json</tool_call>"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1})]
    assert parse_tool_calls("no calls") == ("no calls", [])
    p = StreamingToolParser()
    pieces = [
        p.feed(x)
        for x in (
            "Let me check. <tool",
            '_call>\n{"name": "add",',
            ' "arguments": {"a": 1}}\n</tool_call>',
            " <tx",
        )
    ]
    pieces.append(p.feed("", final=True))
    assert "".join(t for t, _ in pieces) == "Let me check.  <tx"
    assert [c.name for _, cs in pieces for c in cs] == ["add"]
