"""The Drafter interface: what every speculative algorithm (and "none") provides to the engine."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from specserve.core import Request


@dataclass
class DraftProposal:
    """A draft block for one request.

    tokens: the K draft tokens that follow the request's last token.
    probs: [K, V] the exact distribution each draft token was sampled from, or None for
        deterministic proposals (n-gram lookup; greedy drafting), which count as one-hot.
    confidences: [K] estimated P(position k accepted | all earlier accepted), or None.
    """

    tokens: list[int]
    probs: torch.Tensor | None = None
    confidences: torch.Tensor | None = None


@dataclass(frozen=True)
class CatchUp:
    """A `propose`'s fold of deferred context rows (`deferred.py`): how many rows, how long."""

    rows: int = 0
    seconds: float = 0.0


class Drafter(abc.ABC):
    """Proposes draft tokens for running requests and learns from what the target committed.

    Contract, per engine step:
      1. `propose(requests, max_tokens)` -> one DraftProposal per request, with at most
         max_tokens[i] tokens (fewer or none is always allowed).
      2. The target verifies a prefix of each proposal in one forward.
      3. `update(requests, hidden)` with, per request, the captured target hidden states
         [n_i, len(capture_layers) * H] of the n_i tokens whose KV was just committed (prefill
         chunks and accepted verify inputs), in position order; `request.num_computed_tokens`
         already counts them. After a prefix-cache hit, the request's first update also
         carries the cached tokens' rows (from the engine's hidden pool), so it starts at 0.
      4. `release(request)` when the request finishes or is preempted (drop its draft state;
         after preemption, `update` replays the recomputed prefix).
    """

    #: Target layer ids whose hidden states `update` receives (see CausalLM.forward `capture`).
    capture_layers: tuple[int, ...] = ()
    #: The last `propose`'s fold of the context rows committed since the request last drafted
    #: (drafters that defer them, `deferred.py`); the draft gate judges a step without the part
    #: a steady step does not pay (`gate.steady_seconds`).
    catch_up: CatchUp = CatchUp()
    #: Proposals carry a trained confidence head's estimates (DSpark), not a proxy such as the
    #: draft distribution's max probability, so they predict acceptance (the draft gate).
    has_confidence_head: bool = False

    @property
    @abc.abstractmethod
    def max_draft_tokens(self) -> int: ...

    @abc.abstractmethod
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[DraftProposal]: ...

    def update(self, requests: list[Request], hidden: list[torch.Tensor | None]) -> None:
        return None

    def release(self, request: Request) -> None:
        return None

    def num_tracked_requests(self) -> int:
        """Requests this drafter holds draft state for (0 once every request is released)."""
        return 0


class NoDrafter(Drafter):
    """Speculation off: proposes nothing, so every verify window is the plain decode token."""

    @property
    def max_draft_tokens(self) -> int:
        return 0

    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[DraftProposal]:
        return [DraftProposal([]) for _ in requests]
