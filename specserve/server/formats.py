"""OpenAI response bodies: stream chunks, the usage chunk and full bodies of completions and chat."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from specserve.engine.engine import RequestOutput
from specserve.engine.tokenizer import Tokenizer


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

    def chunk(self, index: int, out: RequestOutput) -> dict | None:
        if not out.new_text and not out.finished:
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

    def full(self, results: list[Result]) -> dict:
        choices = [
            self._choice(
                i, r.text, r.logprobs, r.finish_reason, r.stop_reason, r.meta_info, streaming=False
            )
            for i, r in enumerate(results)
        ]
        return self._body(False, choices=choices, usage=usage(results))


class CompletionFormat(Format):
    object_full = object_chunk = "text_completion"

    def _content(self, text: str, streaming: bool) -> dict:
        return {"text": text}

    def _logprobs(self, entries: list) -> dict:
        return _completion_logprobs(entries, self.tok)


class ChatFormat(Format):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

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


def _completion_logprobs(entries: list, tok: Tokenizer) -> dict:
    def s(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    return {
        "tokens": [s(t) for t, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [{s(t): lp for t, lp in top} for _, _, top in entries],
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
