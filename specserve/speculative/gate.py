"""Whether drafting pays, per request and per step: draft, or decode plainly and probe later.

A decode step that drafts for request r commits 1 + a_r tokens for it, where a_r is the number
of draft tokens the target accepts; plain decoding commits 1. Drafting pays when
(1 + a_r) / t_spec > 1 / t_plain, i.e. a_r > t_spec / t_plain - 1, with t_spec and t_plain the
measured wall times of a decode step with and without drafting (the fastest of the last eight
such steps, by batch size and context octave: a step at 2K-token contexts reads eight times the
K/V of one at 256, so times from one length say nothing of the other; t_spec only from steps in
which every candidate drafted, and without the part of the drafter's catch-up on context it
skipped, `steady_seconds`) and a_r r's expected acceptance:
* for a drafter with a confidence head (DSpark; `head_confidences`), what the head predicts
  for the tokens the planner verifies, sum_i prod_{j<=i} c_j, averaged over r's drafted steps
  and judged from the first one;
* for the others, the running acceptance (accepted tokens per verify: the mean of its first
  drafted steps, then a moving average), judged only after `min_samples` drafted steps
  (acceptance comes in bursts: one unlucky first step must not stop drafting). Proxy
  confidences, such as the draft distribution's max probability, are not read: greedy drafts
  are accepted far more often than they predict.
A request with no history of its own starts from the acceptance of the requests of its kind
(greedy or sampled) seen so far, once those have `min_samples` drafted steps: where they did not
pay, a new request decodes plainly and is probed like one judged below the bar, instead of
drafting unjudged (at 16 users on short prompts a drafted step costs about eight plain ones).
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

Above the per-request bar sits a check on what drafting actually gave: each step in which any
request drafted is compared with plain decoding (the tokens it committed at the median plain
step time, over its own time), partial steps and drafter catch-ups included. While that gain,
over the last `gain_window` drafted steps, is below `min_gain`, nobody drafts but on probe
steps, further and further apart (`probe_every` doubling up to `max_pause_every`, 256 steps),
until a probe pays again. A probe step costs several plain ones (every request drafts, and a
paused MTP drafter catches up on the tokens since it last drafted), so where drafting never
pays the probes must be rare: with a cap of 64 steps, gated NEXTN and DSPARK ran at 0.86-0.94x
plain decoding at 16 users on 64-token prompts (demo bundle, three runs), with 256 at
0.95-0.99x; at one user they were unchanged (NEXTN 1.05-1.08x, DSPARK 1.91-1.93x). At 16
users on 64-token prompts the per-request bar, read from the fastest whole drafted steps, let
requests draft in steps that ran at 0.8x plain decoding. `min_gain` is 0.9,
not 1: NEXTN at one user gains 1.1-1.3 per window, dips below 1 in some windows, and paused at
1.0 it fell from 1.11x to 0.95-0.99x plain decoding.

Every probe also waits for a budget: it costs a step's worth of drafting beyond a plain step
(`probe_cost`, measured on the last probe steps at this batch size and context octave; before
any, a whole drafted step's extra time), and it happens only once the plain steps since the last
probe (prefill chunks included) took that extra time / the budget, so probing costs at most
that share of the time spent in steps without drafts, however slow drafting is on this machine
and at this batch size. The budget starts at `probe_budget` (3%) and follows what probes find:
doubled after a probe step that paid (its gain over plain decoding at least `min_gain`), halved
after one that did not, between 1% and 25%, so probes come often where they keep finding that
drafting pays (one user whose text turns predictable in stretches) and cost 1% where they never
do (DFLASH at temperature 1 on 10 users × 1,024 tokens spent the whole fixed 3%: one probe step
of 240 ms per 8 s, mostly the drafter catching up on 10,000 context rows). A probe
beside requests that draft on merit is not held back (their step drafts anyway). Measured on
a 2-core AVX2 host, demo bundle, 16 users on 64-token prompts: a drafted step took 45-108 ms
against 13-16 ms plain (drafting never paid there), and the probes scheduled by interval alone,
three in a 64-step pass, cost NEXTN and DSPARK 12-15% against plain decoding.

Lossless: a decision reads only wall times, acceptance counts and drafter confidences of
earlier steps, never a token of the step it decides. Each step, drafted or not, commits tokens
distributed exactly as the target's given the history, so any choice made from the history
alone leaves the output distribution unchanged (and greedy output token-identical).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from specserve.core import Request
from specserve.speculative.base import DraftProposal
from specserve.speculative.planner import Planner, StepStats


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

    def prior(self, min_samples: int) -> _Acceptance:
        """A new request's start from this population estimate: judged at once."""
        return _Acceptance(
            rate=self.rate,
            samples=min_samples if self.samples else 0,
            expected=self.expected,
            expected_samples=1 if self.expected_samples else 0,
        )


class StepTimes:
    """Decode-step seconds by batch size: the fastest of the last `window` steps of each size.
    Load and one-off work only ever slow a step down, so the recent minimum is the steady cost.
    A moving average keeps a spike for many steps: the step in which a drafter first catches up
    on ten 2,048-token prompts took 10x a steady one, and kept such a batch from drafting while
    no drafted step came to dilute it."""

    def __init__(self, window: int = 8) -> None:
        self.window = window
        self.by_requests: dict[int, deque[float]] = {}

    def observe(self, num_requests: int, seconds: float) -> None:
        times = self.by_requests.setdefault(num_requests, deque(maxlen=self.window))
        times.append(max(0.0, seconds))

    def get(self, num_requests: int) -> float:
        """The steady time at `num_requests` (the nearest size seen; 0 before any)."""
        if not self.by_requests:
            return 0.0
        return min(self._nearest(num_requests))

    def typical(self, num_requests: int) -> float:
        """The median of the recent times at `num_requests` (the nearest size seen)."""
        if not self.by_requests:
            return 0.0
        times = sorted(self._nearest(num_requests))
        return times[len(times) // 2]

    def _nearest(self, num_requests: int) -> deque[float]:
        near = min(self.by_requests, key=lambda r: (abs(r - num_requests), r))
        return self.by_requests[near]


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
        min_gain: float = 0.9,
        gain_window: int = 16,
        max_pause_every: int = 256,
        probe_budget: float | None = 0.03,
        min_probe_budget: float = 0.01,
        max_probe_budget: float = 0.25,
        probation: int = 4,
    ) -> None:
        self.planner, self.probe_every, self.decay = planner, probe_every, decay
        # realised gain of drafted steps over plain decoding (`_observe_gain`): below
        # `min_gain`, no request drafts until a probe step shows that it pays again
        self.min_gain = min_gain
        # (plain-equivalent seconds, seconds) of the last `gain_window` steps that drafted
        self.gain_window = gain_window
        self.gain_steps: deque[tuple[float, float]] = deque(maxlen=gain_window)
        self.paused = False
        self.pause_interval = probe_every
        # after a pause, drafting is judged on its first `probation` drafted steps
        self.probation, self.on_probation = probation, False
        self.min_samples, self.remeasure_every = min_samples, remeasure_every
        self.max_probe_every = max(probe_every, max_probe_every)
        self.max_pause_every = max(probe_every, max_pause_every)
        self.head_confidences = head_confidences
        self.steps_since_plain = 0  # steps since the last plain one
        self.clock = 0  # steps decided (the probe schedule)
        # decode-step seconds without and with drafts, by context octave, then batch size
        self.plain: dict[int, StepTimes] = {}
        self.spec: dict[int, StepTimes] = {}
        self.acceptance: dict[str, _Acceptance] = {}
        # every request's acceptance by kind (greedy or not), and each tracked request's kind
        self.population: dict[bool, _Acceptance] = {}
        self.kinds: dict[str, bool] = {}
        # the last step drafted for every candidate: only such steps time t_spec (a step in
        # which a few requests draft costs less, and would make drafting for all look cheap)
        self.all_drafted = True
        # probes cost at most `budget` of the time spent decoding plainly: a probe step waits
        # until the plain steps since the last one took probe cost / budget seconds. The budget
        # starts at `probe_budget`, doubles after a probe that paid and halves after one that
        # did not, within [min_probe_budget, max_probe_budget] (None: no budget)
        self.budget = probe_budget
        self.min_probe_budget, self.max_probe_budget = min_probe_budget, max_probe_budget
        self.plain_s_since_probe = 0.0
        self.probing = False  # the last step allowed was a probe (nobody drafted on merit)
        self.probed: list[str] = []  # the requests it drafted for
        self.probe_bar = 0.0  # the break-even of that step
        # a probe step's seconds beyond a plain one, by context octave, then batch size
        self.probe_cost: dict[int, StepTimes] = {}

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
                pop = self.population.setdefault(req.params.greedy, _Acceptance())
                pop.add_expected(expected, self.decay)
        return lens

    def break_even(self, num_requests: int, octave: int = 0) -> float:
        """Accepted tokens per step that a drafted request must reach for drafting to pay, at
        `num_requests` decoding with contexts of `octave` (`context_octave`)."""
        plain, spec = self.plain.get(octave), self.spec.get(octave)
        if plain is None or spec is None:
            return 1.0
        return max(0.0, spec.get(num_requests) / max(plain.get(num_requests), 1e-9) - 1.0)

    def allow(
        self, requests: list[Request], num_decoding: int | None = None, context_tokens: int = 0
    ) -> list[bool]:
        """Per request: draft this step (True) or decode it plainly. Step times are keyed by
        `num_decoding`, the requests that get a token this step (drafting or not), and the
        octave of their mean context."""
        self.probed = []
        if not requests:
            return []
        n = len(requests) if num_decoding is None else num_decoding
        octave = context_octave(context_tokens, n)
        plain = self.plain.get(octave)
        if self.steps_since_plain >= self.probe_every and (
            plain is None
            or n not in plain.by_requests
            or self.steps_since_plain >= self.remeasure_every
        ):  # time a plain step at this batch size and context length
            self.steps_since_plain = 0
            self.all_drafted = False
            return [False] * len(requests)
        self.steps_since_plain += 1
        self.clock += 1
        afford = self._can_afford_probe(n, octave)
        self.probing = False
        if self.paused:  # drafting did not pay: only every `pause_interval` steps, a probe
            if self.clock % self.pause_interval or not afford:
                self.all_drafted = False
                return [False] * len(requests)
            self.pause_interval = min(2 * self.pause_interval, self.max_pause_every)
            self.probing = True
        bar = self.break_even(n, octave)
        accs = [self._acceptance_of(r) for r in requests]
        pays = [self._pays(acc, bar) for acc in accs]
        # a probe beside requests that draft on merit adds only its own draft; alone, it makes
        # the whole step a drafting one, and waits for the budget
        afford = afford or any(pays)
        decisions = [self._decide(acc, ok, afford) for acc, ok in zip(accs, pays, strict=True)]
        self.probing = self.probing or (any(decisions) and not any(pays))
        self.probe_bar = bar
        self.probed = [  # drafting not on merit, or on a probe step (all of its drafts)
            r.request_id
            for r, d, ok in zip(requests, decisions, pays, strict=True)
            if d and (self.probing or not ok)
        ]
        self.all_drafted = all(decisions)
        return decisions

    def _can_afford_probe(self, n: int, octave: int) -> bool:
        """The plain steps since the last probe paid for one within the budget: a probe
        step's extra seconds (the last ones measured at this batch size and context octave, or
        a whole drafted step's before any) / budget."""
        if self.budget is None:
            return True
        costs = self.probe_cost.get(octave)
        if costs is not None and costs.by_requests:
            extra = costs.get(n)
        else:
            plain, spec = self.plain.get(octave), self.spec.get(octave)
            if plain is None or spec is None:
                return True
            extra = max(0.0, spec.get(n) - plain.get(n))
        return self.plain_s_since_probe * self.budget >= extra

    def _acceptance_of(self, req: Request) -> _Acceptance | None:
        """The request's own acceptance; for a new one, its kind's once that is judged."""
        rid = req.request_id
        self.kinds[rid] = req.params.greedy
        if rid not in self.acceptance:
            pop = self.population.get(req.params.greedy)
            if pop is None or pop.samples < self.min_samples:
                return None
            self.acceptance[rid] = pop.prior(self.min_samples)
        return self.acceptance[rid]

    def _pays(self, acc: _Acceptance | None, bar: float) -> bool:
        """Drafting pays for this request, judged from its history (none: draft)."""
        if acc is None:
            return True
        if acc.expected_samples:  # the confidence head's estimate
            return acc.expected >= bar
        return acc.samples < self.min_samples or acc.rate >= bar

    def _decide(self, acc: _Acceptance | None, pays: bool, afford: bool) -> bool:
        if acc is None:  # no history: draft
            return True
        interval = acc.interval or self.probe_every
        probe = not pays and afford and self.clock % interval == 0
        if pays:
            acc.interval = self.probe_every
        elif probe:
            acc.interval = min(2 * interval, self.max_probe_every)
        return pays or probe

    def observe(self, stats: StepStats) -> None:
        self.planner.observe(stats)
        if (
            stats.decode_only
            and stats.num_decoding
            and (self.all_drafted or not stats.num_requests)
        ):
            times = self.spec if stats.num_requests else self.plain
            octave = context_octave(stats.context_tokens, stats.num_decoding)
            times.setdefault(octave, StepTimes()).observe(stats.num_decoding, steady_seconds(stats))
            if not stats.num_requests:
                self.steps_since_plain = 0
        if stats.decode_only and stats.num_decoding and stats.num_requests:
            self._observe_gain(stats)
        if not stats.num_requests:
            self.plain_s_since_probe += stats.step_s
        elif self.probing:  # what the probe cost beyond a plain step
            self.plain_s_since_probe = 0.0
            octave = context_octave(stats.context_tokens, stats.num_decoding)
            plain = self.plain.get(octave)
            if stats.decode_only and plain is not None and plain.by_requests:
                extra = max(0.0, stats.step_s - plain.typical(stats.num_decoding))
                self.probe_cost.setdefault(octave, StepTimes()).observe(stats.num_decoding, extra)
        if self.probed:
            self._judge_probe(stats, adapt_budget=self.probing and stats.num_requests > 0)
        for rid, accepted in stats.accepted.items():
            self.acceptance.setdefault(rid, _Acceptance()).add(accepted, self.decay)
            if rid in self.kinds:
                pop = self.population.setdefault(self.kinds[rid], _Acceptance())
                pop.add(accepted, self.decay)
        for rid in stats.finished:
            self._forget(rid)

    def _judge_probe(self, stats: StepStats, adapt_budget: bool) -> None:
        """After a step with probes. A probed request that accepted at least the step's
        break-even drafts again from the next step: its estimate is lifted to the bar (a probe
        is one sample of a moving average that gives it a tenth, and at one user a request
        whose text turned predictable again stayed gated for 30-60 steps). After a probe step
        (probes beside requests that draft on merit do not wait for the budget), the budget
        doubles if the step paid, judged as a paused drafter's probe is (`_against_plain`: a
        gain of at least `min_gain`), else it halves. The acceptance alone is not the judge of
        the budget: at 32 users NEXTN's probes met the break-even of its fastest drafted steps
        while the probe steps themselves lost to plain ones (the pause went on), the budget rose
        to its maximum, and in one run NEXTN drafted at 32 users at 0.96x NONE (the previous
        gate 1.12x)."""
        for rid in self.probed:
            acc = self.acceptance.get(rid)
            if acc is not None and stats.accepted.get(rid, -1) >= self.probe_bar:
                acc.rate = max(acc.rate, self.probe_bar)
                if acc.expected_samples:
                    acc.expected = max(acc.expected, self.probe_bar)
        self.probed = []
        step = self._against_plain(stats)
        if step is not None and adapt_budget:
            self._scale_budget(2.0 if step[0] / step[1] >= self.min_gain else 0.5)

    def _scale_budget(self, factor: float) -> None:
        """Multiply the probe budget by `factor`, within [min_probe_budget, max_probe_budget]."""
        if self.budget is not None:
            scaled = self.budget * factor
            self.budget = min(max(scaled, self.min_probe_budget), self.max_probe_budget)

    def _against_plain(self, stats: StepStats) -> tuple[float, float] | None:
        """A decode step against plain decoding: (the time plain steps need for the tokens it
        committed, one per decoding request per plain step at the median plain step time; its
        own time), or None where that is not known."""
        n = stats.num_decoding
        plain = self.plain.get(context_octave(stats.context_tokens, n))
        if not stats.decode_only or not n or plain is None or not plain.by_requests:
            return None
        seconds = steady_seconds(stats)
        if seconds <= 0:
            return None
        return plain.typical(n) * (n + sum(stats.accepted.values())) / n, seconds

    def _observe_gain(self, stats: StepStats) -> None:
        """A step in which some requests drafted, against plain decoding: the time plain steps
        need for the tokens it committed (one per decoding request per plain step, at the
        median plain step time) and the time it took. Every such step counts, partial ones and
        those that paid a drafter's catch-up too: the per-request bar sees only whole drafted
        steps at their fastest, and at 16 users on short prompts it let requests draft in steps
        that ran at 0.8x plain decoding. The gain is the ratio of the sums over the last
        `gain_window` drafted steps, judged once the window is full, so that a few unlucky steps
        do not stop a drafter that pays. While paused, each probe step is judged alone, and the
        first that pays ends the pause: averaged with the probes that failed before it, one that
        paid did not, and at one user a pause that began on a hard prompt outlasted the three
        predictable prompts after it. A probe can pay by luck, so drafting is then on probation:
        its first `probation` drafted steps are judged together, and if they lose the pause
        resumes where its probe interval was (at four users on short prompts, where a NEXTN
        drafted step runs at about 0.8x plain ones, lucky probes otherwise bought whole windows
        of losing steps); only drafting that passes sets the interval back to `probe_every`.
        The steps on probation are paid from the probe budget (their extra seconds over plain
        steps delay the next probe as the probe's own did), and failing probation halves it."""
        step = self._against_plain(stats)
        if step is None:
            return
        self.gain_steps.append(step)
        if self.on_probation and self.budget:  # paid from the probe budget, like the probe
            plain = self.plain[context_octave(stats.context_tokens, stats.num_decoding)]
            extra = stats.step_s - plain.typical(stats.num_decoding)
            self.plain_s_since_probe -= max(0.0, extra) / self.budget
        if self.paused:  # each probe on its own: earlier probes that failed do not outvote it
            paused = step[0] / step[1] < self.min_gain
        elif len(self.gain_steps) < (self.probation if self.on_probation else self.gain_window):
            return  # judged on a whole window: acceptance comes in bursts
        else:
            paused = self.gain() < self.min_gain
            if self.on_probation and not paused:  # drafting proved itself after a pause
                self.pause_interval = self.probe_every
            elif self.on_probation:  # the probe that ended the pause was luck
                self._scale_budget(0.5)
            self.on_probation = False
        if paused != self.paused:
            self.gain_steps.clear()
            self.on_probation = not paused
        self.paused = paused

    def gain(self) -> float:
        """The realised gain of the drafted steps in the window (1.0 when there are none)."""
        spent = sum(t for _, t in self.gain_steps)
        return sum(p for p, _ in self.gain_steps) / spent if spent else 1.0

    def release(self, request: Request) -> None:
        self.planner.release(request)
        self._forget(request.request_id)

    def _forget(self, request_id: str) -> None:
        self.acceptance.pop(request_id, None)
        self.kinds.pop(request_id, None)


def steady_seconds(stats: StepStats) -> float:
    """The step's seconds with the drafter's catch-up (`StepStats.catch_up`) cut to what a
    steady drafted step folds: the rows this step commits for the requests it drafted for (one
    plus each one's accepted tokens, folded when they draft next). The rest is the context
    committed while a request did not draft (its prompt, a pause), folded once whenever drafting
    starts: judged as what drafting costs per step, the first drafted step after a 2,048-token
    prompt (NEXTN, demo bundle: 50 ms against a 6 ms plain step) set the break-even at 7.6
    accepted tokens, and a server that had served another workload first drafted in 10 of 140
    steps of the next. What probes cost (the budget) still counts the whole step."""
    rows, seconds = stats.catch_up.rows, stats.catch_up.seconds
    steady = stats.num_requests + sum(stats.accepted.values())
    if rows <= steady:
        return stats.step_s
    return stats.step_s - seconds * (1.0 - steady / rows)


def context_octave(context_tokens: int, num_decoding: int) -> int:
    """The context part of a step-time key: the mean context's bit length (contexts of 1,024 to
    2,047 tokens share one octave; 0 when not known)."""
    return (context_tokens // max(1, num_decoding)).bit_length()
