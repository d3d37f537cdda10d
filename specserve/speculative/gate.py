"""Whether drafting pays, per request and per step: draft, or decode plainly and probe later.

A decode step that drafts for request r commits 1 + a_r tokens for it, where a_r is the number
of draft tokens the target accepts; plain decoding commits 1. Drafting pays when
(1 + a_r) / t_spec > 1 / t_plain, i.e. a_r > t_spec / t_plain - 1, with t_spec and t_plain the
measured wall times of a decode step with and without drafting (moving averages by batch
size) and a_r r's expected acceptance:
* for a drafter with a confidence head (DSpark; `head_confidences`), what the head predicts
  for the tokens the planner verifies, sum_i prod_{j<=i} c_j, averaged over r's drafted steps
  and judged from the first one;
* for the others, the running acceptance (accepted tokens per verify: the mean of its first
  drafted steps, then a moving average), judged only after `min_samples` drafted steps
  (acceptance comes in bursts: one unlucky first step must not stop drafting). Proxy
  confidences, such as the draft distribution's max probability, are not read: greedy drafts
  are accepted far more often than they predict.
Until both times are measured the bar is one accepted token per step. A busy server rarely has
a step in which no request drafts, so the gate makes one: after `probe_every` steps at a batch
size whose plain step time is unknown, and again after `remeasure_every` steps without a plain
one, one step decodes every request plainly and is timed. A request below the bar decodes
plainly and is probed again (drafts once), so a request whose text turns predictable gets
drafts back. Probes share steps: a step in which anyone drafts pays the drafter's fixed cost
for the whole batch, so requests are probed together, on steps that are multiples of their
probe interval (`probe_every`, doubled after each probe that leaves the request below the bar,
up to `max_probe_every`; all powers of two times `probe_every`, so they coincide). Only
proposals with tokens count as acceptance samples.

Lossless: a decision reads only wall times, acceptance counts and drafter confidences of
earlier steps, never a token of the step it decides. Each step, drafted or not, commits tokens
distributed exactly as the target's given the history, so any choice made from the history
alone leaves the output distribution unchanged (and greedy output token-identical).
"""

from __future__ import annotations

from dataclasses import dataclass

from specserve.core import Request
from specserve.speculative.base import DraftProposal
from specserve.speculative.planner import Planner, StepOverhead, StepStats


@dataclass
class _Acceptance:
    rate: float = 0.0  # accepted draft tokens per verify (mean, then moving average)
    samples: int = 0  # drafted steps seen
    interval: int = 0  # steps between probes while below the bar (0: not set yet)
    expected: float = 0.0  # accepted draft tokens the confidence head predicted (same average)
    expected_samples: int = 0

    def add(self, accepted: int, decay: float) -> None:
        self.samples += 1
        self.rate += max(1.0 - decay, 1.0 / self.samples) * (accepted - self.rate)

    def add_expected(self, expected: float, decay: float) -> None:
        self.expected_samples += 1
        step = max(1.0 - decay, 1.0 / self.expected_samples)
        self.expected += step * (expected - self.expected)


class DraftGate(Planner):
    """A planner that also decides whether each request drafts at all (`allow`); verify lengths
    come from the planner it wraps."""

    def __init__(
        self,
        planner: Planner,
        probe_every: int = 8,
        decay: float = 0.9,
        min_samples: int = 4,
        remeasure_every: int = 64,
        max_probe_every: int = 64,
        head_confidences: bool = False,
    ) -> None:
        self.planner, self.probe_every, self.decay = planner, probe_every, decay
        self.min_samples, self.remeasure_every = min_samples, remeasure_every
        self.max_probe_every = max(probe_every, max_probe_every)
        self.head_confidences = head_confidences
        self.steps_since_plain = 0  # steps since the last plain one
        self.clock = 0  # steps decided (the probe schedule)
        self.plain = StepOverhead()  # decode-step seconds without drafts, by batch size
        self.spec = StepOverhead()  # decode-step seconds with drafts, by batch size
        self.acceptance: dict[str, _Acceptance] = {}

    def plan(self, proposals: list[DraftProposal], requests: list[Request]) -> list[int]:
        lens = self.planner.plan(proposals, requests)
        if not self.head_confidences:
            return lens
        for p, req, n in zip(proposals, requests, lens, strict=True):
            if p.confidences is not None and n > 0:  # what verifying n tokens should accept
                survival, expected = 1.0, 0.0
                for c in p.confidences[:n].tolist():
                    survival *= min(max(c, 0.0), 1.0)
                    expected += survival
                acc = self.acceptance.setdefault(req.request_id, _Acceptance())
                acc.add_expected(expected, self.decay)
        return lens

    def break_even(self, num_requests: int) -> float:
        """Accepted tokens per step that a drafted request must reach for drafting to pay."""
        if not (self.plain.by_requests and self.spec.by_requests):
            return 1.0
        plain = max(self.plain.get(num_requests), 1e-9)
        return max(0.0, self.spec.get(num_requests) / plain - 1.0)

    def allow(self, requests: list[Request], num_decoding: int | None = None) -> list[bool]:
        """Per request: draft this step (True) or decode it plainly. Step times are keyed by
        `num_decoding`, the requests that get a token this step (drafting or not)."""
        if not requests:
            return []
        n = len(requests) if num_decoding is None else num_decoding
        if self.steps_since_plain >= self.probe_every and (
            n not in self.plain.by_requests or self.steps_since_plain >= self.remeasure_every
        ):  # time a plain step at this batch size
            self.steps_since_plain = 0
            return [False] * len(requests)
        self.steps_since_plain += 1
        self.clock += 1
        bar = self.break_even(n)
        return [self._decide(self.acceptance.get(r.request_id), bar) for r in requests]

    def _decide(self, acc: _Acceptance | None, bar: float) -> bool:
        if acc is None:  # no history: draft
            return True
        if acc.expected_samples:  # the confidence head's estimate
            pays = acc.expected >= bar
        else:
            pays = acc.samples < self.min_samples or acc.rate >= bar
        interval = acc.interval or self.probe_every
        probe = not pays and self.clock % interval == 0
        if pays:
            acc.interval = self.probe_every
        elif probe:
            acc.interval = min(2 * interval, self.max_probe_every)
        return pays or probe

    def observe(self, stats: StepStats) -> None:
        self.planner.observe(stats)
        if stats.decode_only and stats.num_decoding:
            times = self.spec if stats.num_requests else self.plain
            times.observe(stats.num_decoding, stats.step_s)
            if not stats.num_requests:
                self.steps_since_plain = 0
        for rid, accepted in stats.accepted.items():
            self.acceptance.setdefault(rid, _Acceptance()).add(accepted, self.decay)
        for rid in stats.finished:
            self.acceptance.pop(rid, None)
