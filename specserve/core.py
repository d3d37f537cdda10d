"""Requests and their sampling parameters: what the scheduler, runner and server pass around."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from specserve.structured.grammar import GrammarSpec


class SamplingParamsError(ValueError):
    """An out-of-range sampling parameter; the message names it (HTTP 400)."""


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
TOP_K_MAX = 2**31 - 1  # a 32-bit k; any k beyond the vocabulary keeps every token
MAX_LOGPROBS = 20  # OpenAI's limit on top logprobs; `--max-logprobs` may lower it


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of an n > 1 request: (seed + index) mod 2**64, so every
    accepted seed gives every choice a valid one (choice 1 of seed 2**64 - 1 uses seed 0)."""
    return None if seed is None else (seed + index) % 2**64


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # number of top logprobs per token; 0 = only the chosen one
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    grammar: GrammarSpec | None = None  # structured output: what the text must match

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (
                self.top_k == -1 or 1 <= self.top_k <= TOP_K_MAX,
                f"top_k must be -1 (disabled) or in [1, {TOP_K_MAX}]",
            ),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (1 <= self.n <= 128, "n must be in [1, 128]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
            (
                self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
                f"seed must be in [{SEED_MIN}, {SEED_MAX}]",
            ),
            (
                all(-100.0 <= b <= 100.0 for _, b in self.logit_bias),
                "logit_bias values must be in [-100, 100]",
            ),
            (all(s for s in self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingParamsError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation stream: prompt tokens, the tokens generated so far, and its KV state.

    `num_computed_tokens` counts tokens of `all_token_ids` whose KV is in the cache; the
    scheduler advances it, speculative rollback never takes it below the committed length.
    """

    prompt_token_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks already published in the prefix cache
    first_token_time: float | None = None
    generator: torch.Generator | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # speculative decoding statistics
    spec_verify_ct: int = 0
    spec_draft_token_num: int = 0
    spec_accept_token_num: int = 0
    spec_accept_histogram: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.all_token_ids[-1]

    @property
    def in_prefill(self) -> bool:
        """True while tokens before the last one still lack KV (prompt or recompute after preemption)."""
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def finished(self) -> bool:
        return self.status.finished
