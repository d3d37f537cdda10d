"""OpenAI response bodies: stream chunks, the usage chunk and full bodies of completions (with
echo and scoring) and chat (with tool calls)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from specserve.engine.engine import RequestOutput
from specserve.engine.tokenizer import Tokenizer
from specserve.server.tool_parser import StreamingToolParser, parse_tool_calls


@dataclass
class Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: Any = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list = field(default_factory=list)
    meta_info: dict | None = None
    prompt_index: int = 0
    prompt_logprobs: list | None = None  # (token, logprob or None, top) per prompt token


def usage(results: list[Result]) -> dict:
    # the n choices of one prompt share it: count each prompt once
    prompt = sum({r.prompt_index: r.prompt_tokens for r in results}.values())
    completion = sum(r.completion_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class Format:
    """OpenAI response bodies for one request id: stream chunks, the usage chunk, the full body."""

    object_full = object_chunk = ""
    continuous_usage = False  # stream_options.continuous_usage_stats

    def __init__(self, rid: str, model: str, created: int, tok: Tokenizer) -> None:
        self.tok = tok
        self.meta: dict[str, Any] = {"id": rid, "created": created, "model": model}

    def _content(self, text: str, streaming: bool) -> dict:
        raise NotImplementedError

    def _logprobs(self, entries: list) -> dict:
        raise NotImplementedError

    def first_chunks(self, n: int) -> list[dict]:
        return []

    def _body(self, streaming: bool, **fields: Any) -> dict:
        kind = self.object_chunk if streaming else self.object_full
        return {
            "id": self.meta["id"],
            "object": kind,
            "created": self.meta["created"],
            "model": self.meta["model"],
            **fields,
        }

    def _choice(
        self,
        index: int,
        text: str,
        logprobs: list,
        finish_reason: str | None,
        stop_reason: Any,
        meta_info: dict | None,
        streaming: bool,
    ) -> dict:
        choice = {
            "index": index,
            **self._content(text, streaming),
            "logprobs": self._logprobs(logprobs) if logprobs else None,
            "finish_reason": finish_reason,
        }
        if finish_reason is not None:
            choice.update(stop_reason=stop_reason, meta_info=meta_info)
        return choice

    def chunk(self, index: int, out: RequestOutput, prompt_index: int = 0) -> dict | None:
        """The stream chunk of choice `index` (of prompt `prompt_index`), or None if empty."""
        if not out.new_text and not out.logprobs and not out.finished:
            return None
        choice = self._choice(
            index,
            out.new_text,
            out.logprobs,
            out.finish_reason,
            out.stop_reason,
            out.meta_info,
            streaming=True,
        )
        return self._body(True, choices=[choice])

    def usage_chunk(self, results: list[Result]) -> dict:
        return self._body(True, choices=[], usage=usage(results))

    def running_usage(self, out: RequestOutput) -> dict:
        """The usage of the choice a chunk belongs to, so far (vLLM's continuous usage)."""
        return {
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
        }

    def full(self, results: list[Result]) -> dict:
        choices = [
            self._choice(
                i, r.text, r.logprobs, r.finish_reason, r.stop_reason, r.meta_info, streaming=False
            )
            for i, r in enumerate(results)
        ]
        return self._body(False, choices=choices, usage=usage(results))


class CompletionFormat(Format):
    """Completions, with `echo` (the prompt and its logprobs before the output) and pure
    scoring (`max_tokens: 0`: the one token generated to finish the prefill is dropped)."""

    object_full = object_chunk = "text_completion"

    def __init__(
        self,
        rid: str,
        model: str,
        created: int,
        tok: Tokenizer,
        prompt_texts: list[str],
        echo: bool = False,
        scoring_only: bool = False,
    ) -> None:
        super().__init__(rid, model, created, tok)
        self.prompt_texts, self.echo, self.scoring_only = prompt_texts, echo, scoring_only
        self.offsets: dict[int, int] = {}  # choice -> text_offset of its next token

    def _content(self, text: str, streaming: bool) -> dict:
        return {"text": text}

    def _logprobs(self, entries: list) -> dict:
        return _completion_logprobs(entries, self.tok)

    def _with_echo(
        self, index: int, prompt_index: int, text: str, logprobs: list, prompt_logprobs: list | None
    ) -> tuple[str, dict | None]:
        """The choice's text and logprobs (text_offset continuing across stream chunks)."""
        if self.scoring_only:
            text, logprobs = "", []
        first = index not in self.offsets
        if first:
            self.offsets[index] = 0 if self.echo else len(self.prompt_texts[prompt_index])
        if first and self.echo:
            text = self.prompt_texts[prompt_index] + text
            logprobs = list(prompt_logprobs or []) + list(logprobs)
        if not logprobs:
            return text, None
        body = _completion_logprobs(logprobs, self.tok, self.offsets[index])
        self.offsets[index] += sum(len(t) for t in body["tokens"])
        return text, body

    def chunk(self, index: int, out: RequestOutput, prompt_index: int = 0) -> dict | None:
        text, lp = self._with_echo(
            index, prompt_index, out.new_text, out.logprobs, out.prompt_logprobs
        )
        if not text and not lp and not out.finished:
            return None
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": None}
        if out.finished:
            choice.update(
                finish_reason=out.finish_reason,
                stop_reason=out.stop_reason,
                meta_info=out.meta_info,
            )
        return self._body(True, choices=[choice])

    def full(self, results: list[Result]) -> dict:
        choices = []
        for i, r in enumerate(results):
            text, lp = self._with_echo(i, r.prompt_index, r.text, r.logprobs, r.prompt_logprobs)
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": lp,
                    "finish_reason": r.finish_reason,
                    "stop_reason": r.stop_reason,
                    "meta_info": r.meta_info,
                }
            )
        return self._body(False, choices=choices, usage=self._usage(results))

    def usage_chunk(self, results: list[Result]) -> dict:
        return self._body(True, choices=[], usage=self._usage(results))

    def _usage(self, results: list[Result]) -> dict:
        if self.scoring_only:
            results = [replace(r, completion_tokens=0) for r in results]
        return usage(results)


class ChatFormat(Format):
    """Chat bodies; with tools, the output's tool calls become `tool_calls` (whole calls in
    streamed deltas, finish_reason `tool_calls`)."""

    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def __init__(
        self,
        rid: str,
        model: str,
        created: int,
        tok: Tokenizer,
        parse_tools: bool = False,
        single_call: bool = False,
    ) -> None:
        super().__init__(rid, model, created, tok)
        self.parse_tools, self.single_call = parse_tools, single_call
        self.parsers: dict[int, StreamingToolParser] = {}

    def _calls(self, calls: list, before: int) -> list:
        return calls[: max(0, 1 - before)] if self.single_call else calls

    def chunk(self, index: int, out: RequestOutput, prompt_index: int = 0) -> dict | None:
        if not self.parse_tools:
            return super().chunk(index, out)
        parser = self.parsers.setdefault(index, StreamingToolParser())
        before = parser.num_calls
        text, calls = parser.feed(out.new_text, final=out.finished)
        calls = self._calls(calls, before)
        delta: dict[str, Any] = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = [c.to_openai(before + k) for k, c in enumerate(calls)]
        if not delta and not out.logprobs and not out.finished:
            return None
        finish = out.finish_reason
        if finish == "stop" and parser.num_calls:
            finish = "tool_calls"
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": self._logprobs(out.logprobs) if out.logprobs else None,
            "finish_reason": finish,
        }
        if out.finished:
            choice.update(stop_reason=out.stop_reason, meta_info=out.meta_info)
        return self._body(True, choices=[choice])

    def full(self, results: list[Result]) -> dict:
        body = super().full(results)
        for choice in body["choices"] if self.parse_tools else []:
            content, calls = parse_tool_calls(choice["message"]["content"])
            calls = self._calls(calls, 0)
            if calls:
                choice["message"] = {
                    "role": "assistant",
                    "content": content or None,
                    "tool_calls": [c.to_openai() for c in calls],
                }
                if choice["finish_reason"] == "stop":
                    choice["finish_reason"] = "tool_calls"
        return body

    def _content(self, text: str, streaming: bool) -> dict:
        if streaming:
            return {"delta": {"content": text} if text else {}}
        return {"message": {"role": "assistant", "content": text}}

    def _logprobs(self, entries: list) -> dict:
        return _chat_logprobs(entries, self.tok)

    def first_chunks(self, n: int) -> list[dict]:
        first = {
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return [self._body(True, choices=[{"index": i, **first}]) for i in range(n)]


def _completion_logprobs(entries: list, tok: Tokenizer, offset: int = 0) -> dict:
    """OpenAI's legacy logprobs; an entry with logprob None (the first prompt token under
    echo) has top_logprobs None; text_offset counts characters from `offset`."""

    def s(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    tokens = [s(t) for t, _, _ in entries]
    starts = [offset + n for n in itertools.accumulate((len(t) for t in tokens), initial=0)]
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [
            None if lp is None else {s(t): v for t, v in top} for _, lp, top in entries
        ],
        "text_offset": starts[:-1],
    }


def _chat_logprobs(entries: list, tok: Tokenizer) -> dict:
    def item(t: int, lp: float) -> dict:
        s = tok.decode([t], skip_special_tokens=False)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {
        "content": [
            {**item(t, lp), "top_logprobs": [item(a, b) for a, b in top]} for t, lp, top in entries
        ]
    }
