"""DraftGate: draft only where it pays (measured step times vs running acceptance), probe again
later, and stay lossless."""

from __future__ import annotations

import pytest

from specserve.core import Request, SamplingParams
from specserve.speculative.gate import DraftGate, context_octave
from specserve.speculative.planner import Planner, StepStats

from .conftest import ALGORITHMS, PROMPTS, assert_kv_baseline, make_llm


def _req(rid: str) -> Request:
    return Request([1, 2, 3], SamplingParams(max_tokens=8), 8, request_id=rid)


def _decode(gate: DraftGate, seconds: float, accepted: dict[str, int], n: int = 2) -> None:
    gate.observe(
        StepStats(len(accepted), 0.0, seconds, True, n, accepted)  # a decode-only step
    )


def test_break_even_from_measured_step_times():
    gate = DraftGate(Planner())
    assert gate.break_even(2) == 1.0  # nothing measured: one accepted token per step
    _decode(gate, 3.0, {"a": 0, "b": 0})  # drafting steps take 3 s
    assert gate.break_even(2) == 1.0  # plain steps not measured yet
    _decode(gate, 1.0, {})  # plain steps take 1 s
    assert gate.break_even(2) == pytest.approx(2.0)  # 3 s must give 3 tokens: 2 accepted


def test_skips_below_the_bar_probes_again_and_forgets_finished_requests():
    gate = DraftGate(Planner(), probe_every=4, decay=0.5, min_samples=1)
    good, bad = _req("good"), _req("bad")
    assert gate.allow([good, bad]) == [True, True]  # no history: draft
    _decode(gate, 2.0, {"good": 3, "bad": 0})
    _decode(gate, 1.0, {})  # break-even: 2 s / 1 s - 1 = 1 accepted token
    decisions = [gate.allow([good, bad]) for _ in range(8)]  # steps 2..9
    assert [d[0] for d in decisions] == [True] * 8
    assert [d[1] for d in decisions] == [False, False, True, False] * 2  # probes at 4 and 8
    _decode(gate, 2.0, {"good": 3, "bad": 4})  # the probe was accepted well: 0.5*0 + 0.5*4
    assert gate.allow([good, bad]) == [True, True]
    gate.observe(StepStats(0, 0.0, 1.0, True, 2, {}, finished=("good", "bad")))
    assert gate.acceptance == {}


def test_an_aborted_request_is_forgotten(bundle):
    """The engine's abort reaches the gate: its acceptance and kind go with the request."""
    llm = make_llm(bundle, "NGRAM", gate=True)
    gate = llm.engine.planner
    assert isinstance(gate, DraftGate)
    req = llm.engine.add_request(PROMPTS[0], SamplingParams(max_tokens=64, temperature=0))
    for _ in range(4):
        llm.engine.step()
    assert req.request_id in gate.kinds
    llm.engine.abort(req.request_id)
    assert req.request_id not in gate.kinds and req.request_id not in gate.acceptance


def test_a_request_is_judged_after_min_samples_drafted_steps():
    gate = DraftGate(Planner(), min_samples=3, min_gain=0.0)  # the request's own bar only
    req = _req("r")
    _decode(gate, 2.0, {"other": 5})  # a drafting step: 2 s
    _decode(gate, 1.0, {})  # a plain one: 1 s, so the break-even is 1 accepted token
    for accepted in (0, 0):
        assert gate.allow([req]) == [True]
        _decode(gate, 2.0, {"r": accepted})
    assert gate.allow([req]) == [True]  # two samples: not judged yet
    _decode(gate, 2.0, {"r": 3})  # mean of 0, 0, 3 = 1.0 >= break-even 1.0
    assert gate.acceptance["r"].rate == pytest.approx(1.0)
    assert gate.allow([req]) == [True]
    _decode(gate, 2.0, {"r": 0})  # mean of four = 0.75 < 1.0: decode plainly
    assert gate.allow([req]) == [False]


def test_the_confidence_head_judges_from_the_first_drafted_step():
    """With confidences the expected acceptance of the verified tokens (sum of cumulative
    products) is the estimate, from one drafted step on; without them, min_samples apply."""
    import torch

    from specserve.speculative.base import DraftProposal

    gate = DraftGate(Planner(), min_samples=3, head_confidences=True)
    _decode(gate, 2.0, {"x": 5})
    _decode(gate, 1.0, {})  # break-even: 1 accepted token
    sure, unsure, plain = _req("sure"), _req("unsure"), _req("plain")
    proposals = [
        DraftProposal([1, 2, 3], confidences=torch.tensor([0.9, 0.9, 0.5])),  # 0.9+0.81+0.405
        DraftProposal([1, 2, 3], confidences=torch.tensor([0.5, 0.4, 0.9])),  # 0.5+0.2+0.18
        DraftProposal([1, 2, 3]),
    ]
    assert gate.plan(proposals, [sure, unsure, plain]) == [3, 3, 3]
    assert gate.acceptance["sure"].expected == pytest.approx(2.115)
    assert gate.acceptance["unsure"].expected == pytest.approx(0.88)
    _decode(gate, 2.0, {"sure": 0, "unsure": 3, "plain": 0})  # realised counts do not decide
    assert gate.allow([sure, unsure, plain]) == [True, False, True]  # plain: one sample of 3


def test_times_a_plain_step_itself_when_none_happens():
    """Every request drafts, so no plain step is ever timed: after `probe_every` drafted steps
    one step decodes everyone plainly; measured, the next comes after `remeasure_every`."""
    gate = DraftGate(Planner(), probe_every=3, remeasure_every=5)
    reqs = [_req("a"), _req("b")]
    decisions = []
    for _ in range(4):
        decisions.append(gate.allow(reqs))
        _decode(gate, 2.0, {"a": 3, "b": 3})
    assert decisions == [[True, True]] * 3 + [[False, False]]
    _decode(gate, 1.0, {})  # the plain step's time (its own observe call)
    assert gate.break_even(2) == pytest.approx(1.0)  # ~2 s / ~1 s - 1
    decisions = [gate.allow(reqs) for _ in range(6)]
    assert decisions == [[True, True]] * 5 + [[False, False]]


def test_steps_with_prefill_do_not_count_as_decode_times():
    gate = DraftGate(Planner())
    gate.observe(StepStats(0, 0.0, 50.0, False, 2, {}))
    assert not gate.plain and gate.break_even(2) == 1.0


def test_wraps_the_verify_planner():
    class Half(Planner):
        def plan(self, proposals, requests):
            return [len(p.tokens) // 2 for p in proposals]

    from specserve.speculative.base import DraftProposal

    gate = DraftGate(Half())
    assert gate.plan([DraftProposal([1, 2, 3, 4])], [_req("a")]) == [2]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_gated_greedy_is_identical_to_plain(bundle, algorithm):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(bundle).generate(PROMPTS, params)]
    llm = make_llm(bundle, algorithm, gate=True)  # the default policy
    assert isinstance(llm.engine.planner, DraftGate)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == want
    assert_kv_baseline(llm)
    st = llm.engine.stats
    assert st.num_drafts > 0
    if algorithm == "NEXTN":  # a random MTP module is rarely right: the gate must skip it
        assert st.num_drafts < st.num_verify_passes


def test_step_times_are_keyed_by_the_requests_that_decode():
    """Three requests decode but one is at its last token (no room to draft): the gate is asked
    about two. Its step times are observed under three, so that is the key it must check;
    reading two, it never finds the plain time and forces an all-plain step every
    `probe_every` drafted steps, and judges against the times of another batch size."""
    gate = DraftGate(Planner(), probe_every=3, remeasure_every=50)
    reqs = [_req("a"), _req("b")]
    _decode(gate, 9.0, {"x": 0}, n=2)  # another batch size: drafting steps of 2 take 9 s
    _decode(gate, 2.0, {"a": 3, "b": 3}, n=3)  # three decode: 2 s drafting, 1 s plain
    _decode(gate, 1.0, {}, n=3)
    assert gate.break_even(3) == pytest.approx(1.0)
    decisions = [gate.allow(reqs, num_decoding=3) for _ in range(10)]
    assert decisions == [[True, True]] * 10  # plain time at 3 known: no re-timing before 50
    gate.acceptance["a"].rate = 1.5  # above the bar at 3 decoding (1), below that at 2 (8)
    gate.acceptance["a"].samples = 9
    assert gate.allow(reqs, num_decoding=3) == [True, True]


def test_probes_share_steps_and_back_off():
    """Requests below the bar are probed on the same steps (a drafting step costs the whole
    batch), and each probe that leaves a request below the bar doubles its interval."""
    gate = DraftGate(Planner(), probe_every=2, min_samples=1, max_probe_every=8, probe_budget=None)
    a, b = _req("a"), _req("b")
    _decode(gate, 2.0, {"a": 0})  # a judged: below the bar of 1
    _decode(gate, 1.0, {})
    probes = {"a": [], "b": []}
    for step in range(1, 25):
        if step == 3:
            _decode(gate, 2.0, {"b": 0})  # b judged two steps later
        for req, ok in zip((a, b), gate.allow([a, b]), strict=True):
            if ok and req.request_id in gate.acceptance:
                probes[req.request_id].append(step)
    assert probes["a"] == [2, 4, 8, 16, 24]  # intervals 2, 2, 4, 8, 8 (the cap)
    assert set(probes["b"]) <= set(probes["a"])


def test_proxy_confidences_do_not_judge():
    """Without a confidence head (DFlash's and MTP's max draft probability), the realised
    acceptance judges: a low proxy must not stop drafting that is being accepted."""
    import torch

    from specserve.speculative.base import DraftProposal

    gate = DraftGate(Planner(), min_samples=1)
    _decode(gate, 2.0, {"x": 5})
    _decode(gate, 1.0, {})  # break-even: 1 accepted token
    req = _req("r")
    gate.plan([DraftProposal([1, 2, 3], confidences=torch.tensor([0.3, 0.3, 0.3]))], [req])
    _decode(gate, 2.0, {"r": 3})
    assert gate.acceptance["r"].expected_samples == 0
    assert gate.allow([req]) == [True]


def test_the_factory_trusts_only_a_confidence_head(bundle):
    gates = {a: make_llm(bundle, a, gate=True).engine.planner for a in ("DFLASH", "DSPARK")}
    assert not gates["DFLASH"].head_confidences and gates["DSPARK"].head_confidences


def test_step_times_at_one_context_length_do_not_judge_another():
    """Short-context steps (plain 1 s, drafted 1.5 s) say nothing of steps at 2K-token contexts,
    where the K/V read dominates: there the gate times a plain step of its own, and until then
    the bar is the default one token."""
    gate = DraftGate(Planner(), probe_every=2, min_samples=1)
    short, long = 2 * 256, 2 * 2048  # two requests' contexts
    gate.observe(StepStats(2, 0.0, 1.5, True, 2, {"x": 1}, context_tokens=short))
    gate.observe(StepStats(0, 0.0, 1.0, True, 2, {}, context_tokens=short))
    gate.observe(StepStats(2, 0.0, 6.0, True, 2, {"x": 1}, context_tokens=long))
    assert gate.break_even(2, context_octave(short, 2)) == pytest.approx(0.5)
    assert gate.break_even(2, context_octave(long, 2)) == 1.0  # a stale 1 s would give 5
    reqs = [_req("a"), _req("b")]
    decisions = [gate.allow(reqs, 2, long) for _ in range(3)]
    assert decisions == [[True, True], [True, True], [False, False]]  # timed: no plain at 2K
    gate.observe(StepStats(0, 0.0, 4.0, True, 2, {}, context_tokens=long))
    assert gate.break_even(2, context_octave(long, 2)) == pytest.approx(0.5)
    assert context_octave(long, 2) != context_octave(short, 2)


def test_a_new_request_starts_from_its_kinds_acceptance():
    """Once earlier sampled requests were judged below the bar, a new sampled request decodes
    plainly and is only probed; a greedy one (another kind, no history) still drafts; and after
    the population does pay, new requests draft from their first step."""
    gate = DraftGate(Planner(), probe_every=4, min_samples=2)
    old = _req("old")
    assert gate.allow([old]) == [True]
    _decode(gate, 3.0, {"old": 0}, n=1)  # drafting steps take 3 s, plain 1 s: the bar is 2
    _decode(gate, 1.0, {}, n=1)
    _decode(gate, 3.0, {"old": 0}, n=1)
    new = _req("new")
    greedy = Request([1, 2, 3], SamplingParams(max_tokens=8, temperature=0), 8, request_id="g")
    decisions = [gate.allow([new, greedy], num_decoding=1) for _ in range(4)]
    assert [d[0] for d in decisions] == [False, False, True, False]  # a probe at clock 4
    assert all(d[1] for d in decisions)  # no greedy history: drafts unjudged
    for _ in range(6):  # sampled requests now accept 5 tokens a step: the population pays
        _decode(gate, 3.0, {"old": 5}, n=1)
    assert gate.allow([_req("newer")], num_decoding=1) == [True]


def test_drafting_pauses_while_drafted_steps_lose_to_plain_ones():
    """Whatever the per-request bar says, when the steps in which requests drafted commit fewer
    tokens per second than plain steps do, nobody drafts but on probe steps, further and further
    apart; once drafted steps pay again, drafting resumes."""
    gate = DraftGate(Planner(), probe_every=4, max_pause_every=16, gain_window=2, probe_budget=None)
    reqs = [_req("a"), _req("b")]
    _decode(gate, 1.0, {})  # plain steps: 1 s for 2 tokens
    for _ in range(2):  # drafted: 3 s for 2 + 2 tokens (the bar of 2 s / 1 s - 1 is not used)
        assert gate.allow(reqs) == [True, True]
        _decode(gate, 3.0, {"a": 1, "b": 1})
    assert gate.paused  # gain 1 s * 4 / (2 * 3 s) = 0.67
    drafted = [i for i in range(50) if gate.allow(reqs) == [True, True]]
    assert drafted == [1, 5, 13, 29, 45]  # clock 4, 8, 16, 32, 48: the interval doubles up to 16
    for _ in range(6):  # drafted steps that pay: 1.5 s for 2 + 6 tokens
        _decode(gate, 1.5, {"a": 3, "b": 3})
    assert not gate.paused
    assert gate.allow(reqs) == [True, True]


def test_probes_wait_until_plain_steps_paid_for_them():
    """A probe step's extra seconds over a plain one come out of a budget: with 10%, a probe
    that costs 2 s more than a 1 s plain step waits for 20 s of plain steps since the last."""
    gate = DraftGate(
        Planner(),
        probe_every=1,
        max_pause_every=1,
        gain_window=1,
        probe_budget=0.1,
        min_probe_budget=0.1,  # held at 10% here; how it adapts is the next test
    )
    reqs = [_req("a"), _req("b")]
    _decode(gate, 1.0, {})  # plain: 1 s
    assert gate.allow(reqs) == [True, True]
    _decode(gate, 3.0, {"a": 0, "b": 0})  # drafted, nothing accepted: 2 s more than plain
    assert gate.paused
    allowed = []
    for _ in range(45):
        ok = gate.allow(reqs)
        allowed.append(all(ok))
        _decode(gate, 3.0 if all(ok) else 1.0, {"a": 0, "b": 0} if all(ok) else {})
    # 20 plain steps (the first before the first drafted step) between probes
    assert [i for i, ok in enumerate(allowed) if ok] == [19, 40]
    assert gate.paused


def test_the_probe_budget_halves_after_probes_that_fail_and_doubles_after_one_that_pays():
    """A probe step that loses to plain steps halves the budget (down to the minimum), so the
    next one waits twice as long; one that pays doubles it."""
    gate = DraftGate(
        Planner(),
        probe_every=1,
        max_probe_every=1,
        min_samples=1,
        probe_budget=0.1,
        min_probe_budget=0.025,
        max_probe_budget=0.4,
    )
    req = _req("a")
    _decode(gate, 1.0, {}, n=1)  # plain: 1 s
    assert gate.allow([req], num_decoding=1) == [True]  # no history: drafts
    _decode(gate, 3.0, {"a": 0}, n=1)  # 2 s more than plain, nothing accepted: bar 2 tokens
    probes, budgets = [], []
    for i in range(150):
        if gate.allow([req], num_decoding=1)[0]:
            probes.append(i)
            _decode(gate, 3.0, {"a": 0}, n=1)
            budgets.append(gate.budget)
        else:
            _decode(gate, 1.0, {}, n=1)
    # 2 s of extra per probe: it waits for 20, then 40, then 80 plain seconds (the first
    # counted from the start)
    assert probes == [19, 60, 141]
    assert budgets == [0.05, 0.025, 0.025]
    for _ in range(80):
        gate.allow([req], num_decoding=1)
        _decode(gate, 1.0, {}, n=1)
    assert gate.allow([req], num_decoding=1) == [True]
    _decode(gate, 3.0, {"a": 3}, n=1)  # 4 tokens in 3 s, plain steps give 3: it paid
    assert gate.budget == 0.05


def test_a_probe_that_pays_ends_a_pause_whatever_the_probes_before_it_found():
    gate = DraftGate(Planner(), probe_every=1, max_pause_every=1, gain_window=2, probe_budget=None)
    reqs = [_req("a"), _req("b")]
    _decode(gate, 1.0, {})  # plain steps: 1 s for 2 tokens
    for _ in range(2):  # drafted: 3 s for 2 tokens
        assert gate.allow(reqs) == [True, True]
        _decode(gate, 3.0, {"a": 0, "b": 0})
    assert gate.paused
    for _ in range(3):  # probes that fail: 3 s for 2 tokens
        assert gate.allow(reqs) == [True, True]
        _decode(gate, 3.0, {"a": 0, "b": 0})
        assert gate.paused
    assert gate.allow(reqs) == [True, True]
    _decode(gate, 1.5, {"a": 2, "b": 2})  # 6 tokens in 1.5 s: gain 2, alone; 1.0 with the rest
    assert not gate.paused


def test_a_probe_that_accepts_the_break_even_gives_drafting_back_at_once():
    """One probe is one sample of a moving average (a tenth of it); a request whose probe
    accepted at least the break-even drafts again from the next step, and the average judges
    the steps after it."""
    gate = DraftGate(Planner(), probe_every=2, min_samples=2, min_gain=0.0, probe_budget=None)
    req = _req("r")
    _decode(gate, 1.0, {}, n=1)  # plain: 1 s
    for _ in range(2):
        assert gate.allow([req], num_decoding=1) == [True]
        _decode(gate, 2.0, {"r": 0}, n=1)  # 2 s, nothing accepted: the bar is 1 token
    allowed = [gate.allow([req], num_decoding=1)[0] for _ in range(2)]
    assert allowed == [False, True]  # the probe, at clock 4
    _decode(gate, 2.0, {"r": 2}, n=1)  # it accepted 2: the average alone would say 0.2
    assert gate.acceptance["r"].rate >= 1.0
    for _ in range(2):  # and the average judges the next steps: two zeros, below the bar
        assert gate.allow([req], num_decoding=1) == [True]
        _decode(gate, 2.0, {"r": 0}, n=1)
    assert gate.allow([req], num_decoding=1) == [False]


def test_drafting_after_a_pause_is_on_probation():
    """The probe that ended a pause may have been lucky: the next `probation` drafted steps are
    judged together; if they lose, the pause resumes with its probe interval still doubled, and
    only drafting that passes sets the interval back."""
    gate = DraftGate(
        Planner(), probe_every=2, max_pause_every=32, gain_window=2, probation=2, probe_budget=None
    )
    reqs = [_req("a"), _req("b")]
    _decode(gate, 1.0, {})  # plain steps: 1 s for 2 tokens

    def draft(seconds: float, accepted: int, steps: int) -> None:
        for _ in range(steps):
            assert gate.allow(reqs) == [True, True]
            _decode(gate, seconds, {"a": accepted, "b": accepted})

    def until_probe() -> None:
        while gate.allow(reqs) != [True, True]:
            _decode(gate, 1.0, {})

    draft(3.0, 0, 2)  # 3 s for 2 tokens: a pause
    assert gate.paused and gate.pause_interval == 2
    until_probe()
    _decode(gate, 1.5, {"a": 2, "b": 2})  # a probe that pays: gain 2
    assert not gate.paused and gate.pause_interval == 4
    draft(3.0, 0, 2)  # the two steps on probation lose
    assert gate.paused and gate.pause_interval == 4  # not back to 2
    until_probe()
    _decode(gate, 1.5, {"a": 2, "b": 2})
    assert not gate.paused
    draft(1.5, 2, 2)  # these pay: probation passed
    assert not gate.paused and gate.pause_interval == 2


def test_probation_is_paid_from_the_probe_budget():
    gate = DraftGate(
        Planner(),
        probe_every=1,
        max_pause_every=1,
        gain_window=2,
        probation=2,
        probe_budget=0.1,
        min_probe_budget=0.025,
        max_probe_budget=0.4,
    )
    reqs = [_req("a"), _req("b")]
    _decode(gate, 1.0, {})  # plain steps: 1 s for 2 tokens
    for _ in range(2):  # 3 s for 2 tokens: a pause
        assert gate.allow(reqs) == [True, True]
        _decode(gate, 3.0, {"a": 0, "b": 0})
    assert gate.paused
    while gate.allow(reqs) != [True, True]:  # the first probe waits for 20 plain seconds
        _decode(gate, 1.0, {})
    _decode(gate, 1.5, {"a": 2, "b": 2})  # 6 tokens in 1.5 s: it pays, 10% -> 20%
    assert not gate.paused and gate.budget == 0.2
    for _ in range(2):  # probation: 2 s more than plain each, 20 plain seconds at 20%
        assert gate.allow(reqs) == [True, True]
        _decode(gate, 3.0, {"a": 0, "b": 0})
    assert gate.paused and gate.budget == 0.1  # failed: halved
    assert gate.plain_s_since_probe == pytest.approx(-20.0)


def test_a_catch_up_on_skipped_context_is_not_judged_as_the_cost_of_drafting():
    """The first drafted step after a long prompt folds the whole prompt into the drafter's
    context: paid once, not by every drafted step. Judged without it, drafting goes on; the
    probe budget still counts the whole step."""
    from specserve.speculative.base import CatchUp
    from specserve.speculative.gate import steady_seconds

    def step(seconds: float, accepted: dict[str, int], catch_up: CatchUp = CatchUp()):
        return StepStats(len(accepted), 0.0, seconds, True, 2, accepted, catch_up=catch_up)

    # 4,096 rows folded in 0.5 s; a steady step folds the 2 + 4 rows it commits
    first = step(0.52, {"a": 2, "b": 2}, CatchUp(4096, 0.5))
    assert steady_seconds(first) == pytest.approx(0.52 - 0.5 * (1 - 6 / 4096))
    assert steady_seconds(step(0.03, {"a": 2, "b": 2}, CatchUp(6, 0.004))) == 0.03  # steady
    assert steady_seconds(step(0.03, {})) == 0.03

    gate = DraftGate(Planner(), gain_window=1, probe_budget=0.1)
    reqs = [_req("a"), _req("b")]
    _decode(gate, 0.01, {})  # plain: 10 ms
    assert gate.allow(reqs) == [True, True]
    gate.observe(first)  # 6 tokens in about 20 ms of steady work: 3x plain's rate
    assert gate.break_even(2) == pytest.approx(steady_seconds(first) / 0.01 - 1)  # 1.07, not 51
    assert not gate.paused
    assert gate.allow(reqs) == [True, True]


@pytest.mark.parametrize("algorithm", ["NEXTN", "DSPARK"])
def test_the_engine_reports_the_drafters_catch_up(bundle, algorithm):
    """The first drafted step after a prompt folds the prompt's rows into the drafter's context;
    the step's stats say how many rows, and later steps fold only what the step before them
    committed."""
    llm = make_llm(bundle, algorithm)
    seen: list[StepStats] = []
    observe = llm.engine.planner.observe
    llm.engine.planner.observe = lambda stats: (seen.append(stats), observe(stats))[1]
    prompt = list(range(30, 70))
    llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))
    drafted = [s for s in seen if s.num_requests]
    assert drafted and drafted[0].catch_up.rows >= len(prompt) - 1
    assert drafted[0].catch_up.seconds > 0
    for before, after in zip(drafted, drafted[1:], strict=False):
        assert 0 < after.catch_up.rows <= 1 + sum(before.accepted.values())
