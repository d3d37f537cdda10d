"""OpenAI-compatible request and response bodies (pydantic), SGLang's and vLLM's native request
bodies, and their translation to SamplingParams.

Integers are strict (`true` is not a token id, `"5"` is not a count). `seed` takes any value
`torch.Generator.manual_seed` accepts, [-2**63, 2**64 - 1]; choice i of an n > 1 request uses
(seed + i) mod 2**64 (`core.choice_seed`). `top_k` 0 or -1 disables top-k (as in vLLM); a
`top_k` beyond the vocabulary keeps every token.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator
from pydantic_core import PydanticCustomError

from specserve.core import SEED_MAX, SEED_MIN, SamplingParams, SamplingParamsError
from specserve.server.tool_parser import forced_calls_grammar
from specserve.structured.grammar import GrammarSpec

Count = Annotated[StrictInt, Field(ge=1)]
Seed = Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)]


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage so far in every chunk


def _unset(v: Any) -> bool:
    return v is None


# OpenAI parameters specserve does not implement, and the values that ask for nothing beyond
# what it does. Any other value is a 400 naming the parameter, never silently ignored.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: not v,
    "audio": _unset,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": _unset,
    "functions": _unset,
    "function_call": lambda v: v in (None, "none"),
    "store": lambda v: not v,
    "metadata": lambda v: not v,
    "service_tier": lambda v: v in (None, "auto", "default"),
    "reasoning_effort": _unset,
    "verbosity": _unset,
    "web_search_options": _unset,
    "moderation": _unset,
    "prompt_cache_retention": _unset,
    "prompt_cache_options": _unset,
}


def _check_supported(value: Any, info: Any) -> Any:
    if not UNSUPPORTED[info.field_name](value):
        raise PydanticCustomError(
            "unsupported",
            "{name}={value} is not supported by this server",
            {"name": info.field_name, "value": json.dumps(value)},
        )
    return value


class _Common(BaseModel):
    # Unknown OpenAI fields are ignored, as OpenAI-compatible servers do; wrong types are not.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = Field(default=None)
    top_p: float | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: float | None = None
    n: StrictInt = 1  # range-checked by SamplingParams
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: Seed | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    user: str | None = None  # an end-user id: by OpenAI's definition it never changes output
    logit_bias: dict[str, float] | None = None
    best_of: Any = None
    # structured output: OpenAI's response_format, SGLang's and vLLM's extra parameters
    response_format: dict[str, Any] | None = None
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        _response_format(v)
        return v

    def grammar_spec(self) -> GrammarSpec | None:
        """The one structured-output constraint of the request, if any."""
        given = {
            name: spec
            for name, spec in (
                ("response_format", _response_format(self.response_format)),
                ("json_schema", _schema_spec(self.json_schema)),
                ("guided_json", _schema_spec(self.guided_json)),
                ("regex", self.regex and GrammarSpec("regex", self.regex)),
                ("guided_regex", self.guided_regex and GrammarSpec("regex", self.guided_regex)),
                ("ebnf", self.ebnf and GrammarSpec("ebnf", self.ebnf)),
                (
                    "guided_grammar",
                    self.guided_grammar and GrammarSpec("ebnf", self.guided_grammar),
                ),
                (
                    "guided_choice",
                    self.guided_choice and GrammarSpec("choice", json.dumps(self.guided_choice)),
                ),
            )
            if spec
        }
        if len(given) > 1:
            raise SamplingParamsError(f"give at most one of {', '.join(given)}")
        return next(iter(given.values()), None)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v and not all(k.strip().isdecimal() for k in v):
            raise ValueError("keys must be token ids")
        return v

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k in (None, 0) else self.top_k,
            min_p=_default(self.min_p, 0.0),
            repetition_penalty=_default(self.repetition_penalty, 1.0),
            frequency_penalty=_default(self.frequency_penalty, 0.0),
            presence_penalty=_default(self.presence_penalty, 0.0),
            seed=self.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            n=self.n,
            logprobs=logprobs,
            logit_bias=tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items()),
            grammar=self.grammar_spec(),
        )


def _default(value: float | None, default: float) -> float:
    return default if value is None else value


def _schema_spec(schema: str | dict[str, Any] | None) -> GrammarSpec | None:
    if schema is None:
        return None
    return GrammarSpec("json_schema", schema if isinstance(schema, str) else json.dumps(schema))


def _response_format(fmt: dict[str, Any] | None) -> GrammarSpec | None:
    """OpenAI's response_format: text, json_object, or json_schema with a `schema`."""
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "")
    spec = (fmt or {}).get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if kind != "json_schema" or not isinstance(schema, dict):
        raise SamplingParamsError(
            "response_format must be text, json_object, or json_schema with json_schema.schema"
        )
    return _schema_spec(schema)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16  # 0: scoring (with echo)
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    echo: bool = False
    best_of: Count | None = None  # only 1: more is not implemented (below)
    suffix: Any = None

    _unsupported = field_validator("best_of", "suffix", mode="before")(_check_supported)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def template_dict(self) -> dict[str, Any]:
        try:
            args = json.loads(self.function.arguments or "{}")
        except json.JSONDecodeError:
            raise ValueError(
                f"tool_calls: the arguments of {self.function.name!r} are not valid JSON"
            ) from None
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.function.name, "arguments": args},
        }


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class _FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: _FunctionName


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None  # an earlier assistant turn's calls
    tool_call_id: str | None = None  # a tool message: which call it answers
    name: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it (tool-call arguments as a mapping, as
        `transformers` passes them)."""
        msg: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            msg["tool_calls"] = [c.template_dict() for c in self.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                msg[key] = getattr(self, key)
        return msg

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    functions: Any = None
    function_call: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    prompt_cache_key: str | None = None  # a cache-routing hint; the prefix cache is automatic
    safety_identifier: str | None = None  # an end-user id, like `user`

    _unsupported = field_validator(
        "best_of", *(k for k in UNSUPPORTED if k not in ("best_of", "suffix")), mode="before"
    )(_check_supported)


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools mean for the prompt, the decoding and the response."""

    render: list[dict[str, Any]] | None = None  # tools for the chat template
    grammar: GrammarSpec | None = None  # required / named: calls forced by a grammar
    parse: bool = False  # read tool calls out of the output
    single: bool = False  # parallel_tool_calls: false


def tool_plan(body: ChatCompletionRequest, parser: str | None) -> ToolPlan:
    """Raises ValueError naming the parameter when the tools cannot be served as asked."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise ValueError("tool_choice: needs tools")
    if choice == "none":
        return ToolPlan()
    single = body.parallel_tool_calls is False
    if choice == "auto":
        if parser is None:
            raise ValueError('tool_choice: "auto" needs a server started with --tool-call-parser')
        return ToolPlan(tools, None, True, single)
    name = None if choice == "required" else choice.function.name
    if name is not None and name not in {t["function"]["name"] for t in tools}:
        raise ValueError(f"tool_choice: no tool is named {name!r}")
    grammar = forced_calls_grammar(tools, name, parallel=name is None and not single)
    return ToolPlan(tools, grammar, True, single or name is not None)


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class NativeSamplingParams(BaseModel):
    """SGLang's `sampling_params` of `/generate`; an unknown key is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: Count | None = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1)] = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    n: StrictInt = 1  # range-checked by SamplingParams
    sampling_seed: Seed | None = None
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: Literal[True] = True
    spaces_between_special_tokens: Literal[True] = True
    no_stop_trim: Literal[False] = False
    min_new_tokens: Literal[0] = 0
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    custom_params: None = None

    def grammar_spec(self) -> GrammarSpec | None:
        given = [
            GrammarSpec(kind, value)
            for kind, value in (
                ("json_schema", self.json_schema),
                ("regex", self.regex),
                ("ebnf", self.ebnf),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise SamplingParamsError("give at most one of json_schema, regex and ebnf")
        return given[0] if given else None

    def to_params(self, prompt_logprobs: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=-1 if self.top_k in (0, -1) else self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.sampling_seed,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            n=self.n,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items()),
            grammar=self.grammar_spec(),
        )


class GenerateRequest(BaseModel):
    """SGLang's `POST /generate` body (one prompt or a batch, text or token ids)."""

    model_config = ConfigDict(extra="ignore")

    text: str | list[str] | None = None
    input_ids: list[StrictInt] | list[list[StrictInt]] | None = None
    sampling_params: NativeSamplingParams = Field(default_factory=NativeSamplingParams)
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: Annotated[StrictInt, Field(ge=-1)] = -1  # -1: output tokens only
    top_logprobs_num: Annotated[StrictInt, Field(ge=0)] = 0
    return_text_in_logprobs: bool = False
    rid: str | None = None
    lora_path: None = None
    image_data: None = None
    return_hidden_states: Literal[False] = False

    def prompts(self) -> list[str | list[int]]:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text and input_ids")
        p = self.text if self.text is not None else self.input_ids
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        if not p:
            raise ValueError("the prompt is empty")
        return list(p)  # type: ignore[arg-type]


class TokenizeRequest(BaseModel):
    """vLLM's `POST /tokenize`: a prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[StrictInt]


# -- responses (documented in the OpenAPI schema) ---------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class _Choice(BaseModel):
    index: int
    finish_reason: str | None
    stop_reason: int | str | None = None
    meta_info: dict[str, Any] | None = None  # SGLang: per-choice token and speculation counts


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first prompt token under echo
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[ChatTokenLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # None when the reply is only tool calls
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]
