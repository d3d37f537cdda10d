"""Verify-length planning: how many of each request's draft tokens the target checks this step.

`Planner` is what the engine holds: `plan(proposals, requests)` before the target forward,
`observe(step_stats)` after the step. The pure tensor functions below do the choosing.

Shapes: R requests, K = the longest draft in the batch. `confidences[r, k]` is the drafter's
conditional estimate c_k = P(position k accepted | all earlier positions accepted); entries at
k >= draft_lens[r] are padding and never read. Every planner returns verify lens [R] long with
0 <= lens[r] <= draft_lens[r]; the verify window of request r is its first lens[r] draft tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from specserve.core import Request
from specserve.speculative.base import CatchUp, DraftProposal
from specserve.speculative.profile import SPSTable


@dataclass(frozen=True)
class StepStats:
    """What one engine step cost and gave, reported after it: wall times and acceptance counts
    of a finished step, never a token, so a planner that learns from it stays lossless."""

    num_requests: int  # requests drafted for
    overhead_s: float  # seconds of the step outside the target forward
    step_s: float = 0.0  # seconds of the whole step (draft, forward, verify, bookkeeping)
    decode_only: bool = False  # every request decoded (no prefill chunk in the forward)
    num_decoding: int = 0  # requests that got a token this step
    accepted: dict[str, int] = field(default_factory=dict)  # id -> accepted, non-empty drafts
    finished: tuple[str, ...] = ()  # requests that ended this step
    context_tokens: int = 0  # the decoding requests' tokens before the step: the K/V it read
    catch_up: CatchUp = CatchUp()  # the drafter's fold of deferred context rows in this step


class Planner:
    """How many draft tokens per request the target verifies. This base verifies them all.

    plan(proposals, requests) -> verify lens [R] with 0 <= lens[r] <= len(proposals[r].tokens);
    the verify window of request r is its first lens[r] draft tokens. A plan may read the
    proposals' confidences but never their tokens (that would bias sampling).
    allow(requests, num_decoding, context_tokens) -> per request, whether it drafts this step at
    all (before drafting); num_decoding: the requests that get a token this step (None:
    len(requests)); context_tokens: their tokens so far (0: not known).
    observe(stats) -> None, once after every step; release(request) -> None, once for an
    aborted request."""

    def plan(self, proposals: list[DraftProposal], requests: list[Request]) -> list[int]:
        return plan_full(draft_lens(proposals)).tolist()

    def allow(
        self, requests: list[Request], num_decoding: int | None = None, context_tokens: int = 0
    ) -> list[bool]:
        return [True] * len(requests)

    def observe(self, stats: StepStats) -> None:
        return None

    def release(self, request: Request) -> None:
        """`request` was aborted: forget what is kept for it (a finished one arrives in
        `StepStats.finished`)."""
        return None


class ThresholdPlanner(Planner):
    """Verify up to the first draft position whose confidence is below `threshold`."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def plan(self, proposals: list[DraftProposal], requests: list[Request]) -> list[int]:
        conf, lens = confidence_matrix(proposals)
        return plan_threshold(conf, lens, self.threshold).tolist()


class PrefixScheduler(Planner):
    """The DSpark hardware-aware prefix scheduler (`plan_scheduler`) over the SPS table, with the
    step's fixed cost learnt from the engine's reports (`StepOverhead`)."""

    def __init__(self, sps: SPSTable) -> None:
        self.sps = sps
        self.overhead = StepOverhead()

    def plan(self, proposals: list[DraftProposal], requests: list[Request]) -> list[int]:
        conf = [
            [1.0] * len(p.tokens)
            if p.confidences is None
            else p.confidences[: len(p.tokens)].tolist()
            for p in proposals
        ]  # a proposal without confidences counts as certain (as `confidence_matrix`)
        overhead_s = self.overhead.get(len(proposals))
        return schedule_prefixes(conf, self.sps, overhead_s=overhead_s)

    def observe(self, stats: StepStats) -> None:
        if stats.num_requests:
            self.overhead.observe(stats.num_requests, stats.overhead_s)


def draft_lens(proposals: list[DraftProposal]) -> Tensor:
    """[R] long: the number of draft tokens of each proposal."""
    return torch.tensor([len(p.tokens) for p in proposals], dtype=torch.long)


def confidence_matrix(proposals: list[DraftProposal]) -> tuple[Tensor, Tensor]:
    """-> confidences [R, K] (1 where a proposal carries none: counted as certain), lens [R]."""
    lens = draft_lens(proposals)
    k = int(lens.max()) if len(proposals) else 0
    conf = torch.ones(len(proposals), k)
    for i, p in enumerate(proposals):
        if p.confidences is not None and p.tokens:
            conf[i, : len(p.tokens)] = p.confidences.float().cpu()
    return conf, lens


def plan_full(draft_lens: Tensor) -> Tensor:
    """Verify every drafted token: draft_lens [R] -> verify lens [R] (a copy)."""
    return draft_lens.clone()


def plan_threshold(confidences: Tensor, draft_lens: Tensor, threshold: float) -> Tensor:
    """Verify the positions before the first one whose confidence is below threshold.

    confidences [R, K] float, draft_lens [R] long -> verify lens [R] long.
    """
    num_req, k = confidences.shape
    stop = (confidences < threshold) | ~_window_mask(k, draft_lens)
    # A sentinel stop column at K makes argmax (first True) defined for every row.
    stop = torch.cat([stop, torch.ones(num_req, 1, dtype=torch.bool, device=stop.device)], dim=1)
    return stop.int().argmax(dim=1).long()


def plan_scheduler(
    confidences: Tensor,
    draft_lens: Tensor,
    sps: SPSTable,
    early_stop: bool = True,
    overhead_s: float = 0.0,
) -> Tensor:
    """The DSpark hardware-aware prefix scheduler (paper Algorithm 1) over all R requests.

    confidences [R, K] float, draft_lens [R] long -> verify lens [R] long (`schedule_prefixes`
    on the rows' first draft_lens[r] confidences)."""
    lens = draft_lens.tolist()
    rows = [row[:n] for row, n in zip(confidences.double().tolist(), lens, strict=True)]
    out = schedule_prefixes(rows, sps, early_stop, overhead_s)
    return torch.tensor(out, dtype=draft_lens.dtype, device=draft_lens.device)


def schedule_prefixes(
    confidences: list[list[float]],
    sps: SPSTable,
    early_stop: bool = True,
    overhead_s: float = 0.0,
) -> list[int]:
    """`plan_scheduler` on Python lists: confidences[r] = request r's draft positions -> verify
    lens. A step plans a few dozen positions, so plain floats beat a chain of tiny tensor ops.

    Survival a[r, j] = prod_{i<=j} c[r, i]. All (r, j) are sorted by a descending (ties: lower j
    first, then lower r, so each request's positions come in order) and admitted one by one.
    With m admitted: batch tokens B = R + m, expected tokens tau = R + sum of admitted a,
    throughput = tau / (overhead_s + 1 / sps(B)). `overhead_s` is the part of a step that does
    not grow with B (drafting, sampling, bookkeeping; the engine measures it, `StepOverhead`);
    with 0 this is the paper's tau * sps(B). Where that fixed part is a large share of the step
    (small targets, CPUs), leaving it out makes every verify token look too expensive.

    early_stop=True stops at the first admission that does not raise throughput. This is what
    keeps speculative sampling lossless: each decision then only reads survivals of positions
    whose earlier tokens are all in the window, never a confidence that depends on a token that
    will not be verified. early_stop=False takes the argmax over every prefix of the sorted
    list; that peeks at tokens it then drops and is lossy (paper Appendix A). Kept for that test.
    """
    num_req = len(confidences)
    order: list[tuple[float, int, int]] = []  # (-survival, j, r)
    for r, row in enumerate(confidences):
        a = 1.0
        for j, c in enumerate(row):
            a *= min(max(c, 0.0), 1.0)
            order.append((-a, j, r))
    order.sort()
    admitted = 0.0
    best = num_req / (overhead_s + 1.0 / sps(num_req)) if num_req else 0.0
    m = 0
    for i, (neg_a, _, _) in enumerate(order, start=1):
        admitted -= neg_a
        throughput = (num_req + admitted) / (overhead_s + 1.0 / sps(num_req + i))
        if throughput > best:
            best, m = throughput, i
        elif early_stop:
            break
    lens = [0] * num_req
    for _, _, r in order[:m]:
        lens[r] += 1
    return lens


class StepOverhead:
    """Seconds of a part of a step by number of requests: the prefix scheduler's overhead outside
    the target forward (by requests drafted for), the draft gate's decode-step times.

    `observe` adds one step; `get` gives an exponential moving average for that request count
    (the nearest count seen, or 0 before any). It reads only wall time, never a token, so a
    planner using it stays lossless."""

    def __init__(self, decay: float = 0.8) -> None:
        self.decay = decay
        self.by_requests: dict[int, float] = {}

    def observe(self, num_requests: int, seconds: float) -> None:
        old = self.by_requests.get(num_requests)
        seconds = max(0.0, seconds)
        new = seconds if old is None else self.decay * old + (1 - self.decay) * seconds
        self.by_requests[num_requests] = new

    def get(self, num_requests: int) -> float:
        if not self.by_requests:
            return 0.0
        if num_requests in self.by_requests:
            return self.by_requests[num_requests]
        near = min(self.by_requests, key=lambda r: (abs(r - num_requests), r))
        return self.by_requests[near]


def _window_mask(k: int, draft_lens: Tensor) -> Tensor:
    """[R, K] bool: True at drafted positions."""
    return torch.arange(k, device=draft_lens.device)[None, :] < draft_lens[:, None]
