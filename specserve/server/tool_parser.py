"""Tool calls in model output (`--tool-call-parser`), and the grammar that forces them.

`hermes` (alias `qwen25`, as SGLang and vLLM name it) reads Hermes/Qwen-style calls:
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number of them, with
free text around. `tool_choice: required` or a named function is enforced through structured
output: a Lark grammar (llguidance) whose calls embed the tools' JSON schemas.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from specserve.structured.grammar import GrammarSpec

TOOL_CALL_PARSERS = ("hermes", "qwen25")
START, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(START) + r"\s*(.*?)\s*" + re.escape(END), re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def _parse_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content outside the calls, the calls). A block that is not a JSON call stays text."""
    calls, content, last = [], [], 0
    for m in _CALL.finditer(text):
        call = _parse_call(m.group(1))
        if call is None:
            continue
        content.append(text[last : m.start()])
        calls.append(call)
        last = m.end()
    content.append(text[last:])
    return "".join(content).strip() if calls else text, calls


class StreamingToolParser:
    """Splits streamed text into content deltas and complete tool calls. Text that may be the
    start of a `<tool_call>` tag is held back until it is known not to be one."""

    def __init__(self) -> None:
        self.buffer = ""
        self.num_calls = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self.buffer += delta
        content, calls = "", []
        while True:
            start = self.buffer.find(START)
            if start < 0:
                keep = 0 if final else _partial_tag(self.buffer)
                cut = len(self.buffer) - keep
                content += self.buffer[:cut]
                self.buffer = self.buffer[cut:]
                break
            content += self.buffer[:start]
            end = self.buffer.find(END, start)
            if end < 0:
                self.buffer = self.buffer[start:]
                if final:  # an unterminated call: give it back as text
                    content, self.buffer = content + self.buffer, ""
                break
            call = _parse_call(self.buffer[start + len(START) : end].strip())
            if call is None:
                content += self.buffer[start : end + len(END)]
            else:
                calls.append(call)
            self.buffer = self.buffer[end + len(END) :]
        self.num_calls += len(calls)
        return content, calls


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of START."""
    for n in range(min(len(text), len(START) - 1), 0, -1):
        if START.startswith(text[-n:]):
            return n
    return 0


def forced_calls_grammar(
    tools: list[dict[str, Any]], name: str | None, parallel: bool
) -> GrammarSpec:
    """A Lark grammar of one (or, when parallel, several) calls to `name` or any tool."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    call_json = json.dumps({**schema, "x-guidance": options})
    more = ' ("\\n" call)*' if parallel else ""
    lark = f'start: call{more}\ncall: "{START}\\n" body "\\n{END}"\nbody: %json {call_json}\n'
    return GrammarSpec("lark", lark)
