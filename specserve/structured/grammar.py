"""Grammar-constrained decoding through llguidance.

A request's `GrammarSpec` (JSON schema, any JSON object, regex, EBNF, Lark or a choice of
strings) is compiled once per distinct spec for the served tokenizer; each request gets its
own `GrammarMatcher`, which follows the committed output tokens.

Speculative decoding: `masks_along(draft)` walks the matcher through the draft tokens and
returns the allowed-token mask at every verify position (row i = after draft[:i]), then rolls
the matcher back, so it always reflects committed tokens only (as the KV cache does after
rollback). The draft is cut after its first forbidden token: that token stays in the window so
the verifier rejects it with probability 1 (the masked target gives it p = 0) and samples from
the residual max(p - q, 0), which keeps the output distributed as the masked target.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

GRAMMAR_BACKENDS = ("llguidance", "none")
KINDS = ("json_schema", "json_object", "regex", "ebnf", "lark", "choice")
# JSON as Python's json.dumps writes it: one space after separators and no other whitespace
# (flexible whitespace lets a model pad output with blanks until max_tokens).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar that does not compile; the message names the problem (HTTP 400)."""


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # one of KINDS
    value: str  # the schema as JSON text, the regex, the grammar, or a JSON list of choices

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}")


class GrammarBackend:
    """Compiles specs for one tokenizer; `matcher(spec)` starts a request's matcher."""

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int, eos_ids: Iterable[int]) -> None:
        import llguidance

        self._llg = llguidance
        self.path, self.vocab_size = Path(tokenizer_dir) / "tokenizer.json", vocab_size
        self.eos_ids = sorted(eos_ids) or None
        self.compile = functools.lru_cache(maxsize=256)(self._compile)

    @functools.cached_property
    def tokenizer(self):
        """Built on the first structured request (it scans the whole vocabulary)."""
        return self._llg.LLTokenizer(
            str(self.path), n_vocab=self.vocab_size, eos_token=self.eos_ids
        )

    def _compile(self, spec: GrammarSpec) -> str:
        m = self._llg.LLMatcher
        try:
            if spec.kind == "json_schema":
                grammar = m.grammar_from_json_schema(spec.value, JSON_OPTIONS)
            elif spec.kind == "json_object":
                grammar = m.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS)
            elif spec.kind == "regex":
                grammar = m.grammar_from_regex(spec.value)
            elif spec.kind == "ebnf":
                grammar = m.grammar_from_lark(self._llg.gbnf_to_lark(spec.value))
            elif spec.kind == "lark":
                grammar = m.grammar_from_lark(spec.value)
            else:
                grammar = m.grammar_from_lark(_choice_lark(spec.value))
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid {spec.kind}: {e}") from None
        error = m.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"invalid {spec.kind}: {error.strip()}")
        return grammar

    def matcher(self, spec: GrammarSpec) -> GrammarMatcher:
        return GrammarMatcher(self._llg.LLMatcher(self.tokenizer, self.compile(spec), log_level=0))


def _choice_lark(value: str) -> str:
    try:
        choices = json.loads(value)
    except json.JSONDecodeError:
        choices = None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarError("a choice must be a non-empty list of strings")
    return "start: " + " | ".join(json.dumps(c) for c in choices)


class GrammarMatcher:
    """One request's grammar state over its committed output tokens."""

    def __init__(self, matcher) -> None:
        self.m = matcher

    def mask(self) -> torch.Tensor:
        """Allowed next tokens, bool [V]. All True once nothing is allowed (after EOS): such a
        row only scores positions the request never reaches."""
        allowed = torch.frombuffer(bytearray(self.m.compute_logit_bias()), dtype=torch.uint8) > 0
        return allowed if allowed.any() else torch.ones_like(allowed)

    def masks_along(self, draft: list[int]) -> tuple[torch.Tensor, int]:
        """(allowed [k + 1, V], k): the masks of a verify window over draft[:k], where the
        draft is cut after its first forbidden token. The matcher ends where it started."""
        rows, consumed = [self.mask()], 0
        for tok in draft:
            if not rows[-1][tok]:
                rows.append(torch.ones_like(rows[-1]))  # after a certain rejection: unused
                break
            self.m.consume_token(tok)
            consumed += 1
            rows.append(self.mask())
        self.m.rollback(consumed)
        return torch.stack(rows), len(rows) - 1

    def advance(self, tokens: list[int]) -> None:
        """Commit tokens the verifier produced (all allowed by construction). Once the grammar
        is complete only EOS is allowed, which ends the request: nothing left to follow."""
        if self.m.is_stopped():
            return
        if not self.m.consume_tokens(tokens):
            raise RuntimeError(f"grammar matcher refused committed tokens: {self.m.get_error()}")
