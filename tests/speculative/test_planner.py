"""Verify-length planners: hand cases and the paper's Appendix A losslessness case."""

import math

import pytest
import torch
from scipy.stats import chisquare

from specserve.speculative.planner import StepOverhead, plan_full, plan_scheduler, plan_threshold
from specserve.speculative.profile import SPSTable
from specserve.speculative.verify import rejection_verify

NAN = math.nan


def chi2_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """χ² goodness of fit of token ids [n] against exact probabilities [V]."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() / probs.double().sum() * tokens.numel()
    return float(chisquare(counts.numpy(), expected.numpy()).pvalue)


def test_plan_full_returns_a_copy():
    lens = torch.tensor([3, 0, 2])
    out = plan_full(lens)
    assert out.tolist() == [3, 0, 2]
    out[0] = 9
    assert lens[0] == 3


def test_plan_threshold_hand_case():
    conf = torch.tensor(
        [
            [0.9, 0.8, 0.3, 0.9],  # below 0.5 at 2 -> verify 2
            [0.2, 0.9, 0.9, 0.9],  # below at 0 -> verify 0
            [0.9, 0.9, 0.9, 0.9],  # never below -> whole draft (2)
            [0.9, 0.1, NAN, 0.0],  # low values only in padding -> whole draft (1)
            [0.5, 0.5, 0.6, 0.49],  # equal to threshold is kept
        ]
    )
    lens = torch.tensor([4, 4, 2, 1, 4])
    assert plan_threshold(conf, lens, 0.5).tolist() == [2, 0, 2, 1, 3]


# Survivals: request 0 -> 0.9, 0.72, 0.36; request 1 -> 0.6, 0.3, 0.27.
# Sorted: .9 (0,0), .72 (0,1), .6 (1,0), .36 (0,2), .3 (1,1), .27 (1,2); R = 2, so B = 2 + m:
#   m  B  tau   sps    throughput
#   0  2  2.00  1.00   2.000
#   1  3  2.90  0.95   2.755
#   2  4  3.62  0.90   3.258   <- next admission lowers it: early stop here -> [2, 0]
#   3  5  4.22  0.70   2.954
#   4  6  4.58  0.60   2.748
#   5  7  4.88  0.65   3.172
#   6  8  5.15  0.70   3.605   <- global maximum -> [3, 3]
CONF = torch.tensor([[0.9, 0.8, 0.5], [0.6, 0.5, 0.9]])
DIP_THEN_RISE = SPSTable((2, 3, 4, 5, 6, 8), (1.0, 0.95, 0.9, 0.7, 0.6, 0.7))


def test_scheduler_hand_case_early_stop_vs_global():
    lens = torch.tensor([3, 3])
    assert plan_scheduler(CONF, lens, DIP_THEN_RISE).tolist() == [2, 0]
    assert plan_scheduler(CONF, lens, DIP_THEN_RISE, early_stop=False).tolist() == [3, 3]


def test_scheduler_ignores_padding_and_respects_draft_lens():
    conf = torch.cat([CONF, torch.tensor([[NAN], [NAN]])], dim=1)
    lens = torch.tensor([3, 3])
    assert plan_scheduler(conf, lens, DIP_THEN_RISE, early_stop=False).tolist() == [3, 3]
    # Request 1 drafted only one token: sorted .9, .72, .6, .36 -> thr 2, 2.755, 3.258, 2.954.
    assert plan_scheduler(CONF, torch.tensor([3, 1]), DIP_THEN_RISE).tolist() == [2, 0]
    flat = SPSTable((1,), (1.0,))  # every admission with a > 0 raises throughput
    assert plan_scheduler(CONF, torch.tensor([3, 1]), flat).tolist() == [3, 1]
    assert plan_scheduler(CONF, torch.tensor([0, 0]), flat).tolist() == [0, 0]
    assert plan_scheduler(torch.zeros(2, 0), torch.tensor([0, 0]), flat).tolist() == [0, 0]


def test_scheduler_ties_admit_lower_positions_first():
    """Survivals (1, 1) and (1, 0): the tie between (0, j=1) and (1, j=0) goes to j=0.

    B = 2 + m, sps 1.0, 0.9, 0.8, 0.6 -> throughput 2, 2.7, 3.2, 3.0: two admissions.
    """
    conf = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    sps = SPSTable((2, 3, 4, 5), (1.0, 0.9, 0.8, 0.6))
    assert plan_scheduler(conf, torch.tensor([2, 2]), sps).tolist() == [1, 1]


def test_scheduler_single_request_appendix_numbers():
    """c = (0.9, 0.9), SPS(1..3) = 1, .5, .45: throughput 1, 0.95, 1.2195."""
    sps = SPSTable((1, 2, 3), (1.0, 0.5, 0.45))
    conf, lens = torch.tensor([[0.9, 0.9]]), torch.tensor([2])
    assert plan_scheduler(conf, lens, sps).tolist() == [0]
    assert plan_scheduler(conf, lens, sps, early_stop=False).tolist() == [2]
    conf = torch.tensor([[0.9, 0.1]])  # 0.45 * (1 + 0.9 + 0.09) = 0.8955 < 1
    assert plan_scheduler(conf, lens, sps, early_stop=False).tolist() == [0]


def test_scheduler_counts_the_fixed_part_of_a_step():
    """Verify time 1 s per batch token (sps = 1/B), two requests with c = 0.9 everywhere.

    Without overhead: B = 2 gives 2 tokens / 2 s = 1 tok/s and admitting (0.9 for 1 more second)
    gives 2.9 / 3 < 1, so nothing is verified. With 10 s of drafting per step that does not
    depend on B: 2 / 12 = 0.167, 2.9 / 13 = 0.223, ... every position pays off."""
    sps = SPSTable(tuple(range(1, 9)), tuple(1.0 / b for b in range(1, 9)))
    conf, lens = torch.full((2, 3), 0.9), torch.tensor([3, 3])
    assert plan_scheduler(conf, lens, sps).tolist() == [0, 0]
    assert plan_scheduler(conf, lens, sps, overhead_s=10.0).tolist() == [3, 3]
    # 2.5 s: 2/4.5 = .444, 2.9/5.5 = .527, 3.8/6.5 = .585, 4.61/7.5 = .615, 5.42/8.5 = .638,
    # 6.149/9.5 = .647, 6.878/10.5 = .655: still rising at the end -> all six.
    assert plan_scheduler(conf, lens, sps, overhead_s=2.5).tolist() == [3, 3]
    # 0.5 s: 2/2.5 = .8, 2.9/3.5 = .829, 3.8/4.5 = .844, 4.61/5.5 = .838: first positions only.
    assert plan_scheduler(conf, lens, sps, overhead_s=0.5).tolist() == [1, 1]


def test_step_overhead_average_by_request_count():
    oh = StepOverhead(decay=0.5)
    assert oh.get(4) == 0.0  # nothing seen yet
    oh.observe(4, 0.010)
    oh.observe(4, 0.020)
    assert oh.get(4) == pytest.approx(0.015)
    oh.observe(16, 0.040)
    assert oh.get(5) == pytest.approx(0.015) and oh.get(20) == pytest.approx(0.040)
    oh.observe(8, -1.0)  # clock noise never makes a negative cost
    assert oh.get(8) == 0.0


# ---------------------------------------------------------------- Appendix A

TARGET = torch.tensor([0.7, 0.3])  # the target's distribution at every position
DRAFT = torch.tensor([0.5, 0.5])


def _simulate(n: int, sps: SPSTable, early_stop: bool, seed: int):
    """One speculative round per trial for a single request; returns (out, num, verify lens).

    The drafter samples x1, x2 from q = (0.5, 0.5). Its confidence for position 1 depends only on
    the anchor (0.9); for position 2 it depends on the drafted x1: 0.9 after token 0 and 0.1
    after token 1. The planner runs per trial (R = 1) on exactly what the engine would pass it;
    verification then runs batched over trials (rows are independent).
    """
    g = torch.Generator().manual_seed(seed)
    draft = torch.multinomial(DRAFT, 2 * n, replacement=True, generator=g).view(n, 2)
    conf = torch.stack([torch.full((n,), 0.9), torch.where(draft[:, 0] == 0, 0.9, 0.1)], dim=1)
    full = torch.tensor([2])
    lens = torch.cat([plan_scheduler(conf[i : i + 1], full, sps, early_stop) for i in range(n)])
    window = torch.where(torch.arange(2)[None, :] < lens[:, None], draft, -1)
    torch.manual_seed(seed + 1)
    out, num = rejection_verify(
        window, lens, DRAFT.expand(n, 2, 2), TARGET.expand(n, 3, 2), [None] * n
    )
    return out, num, lens


def test_appendix_a_early_stop_is_lossless_and_global_search_is_not():
    """Paper Appendix A: target (0.7, 0.3), draft (0.5, 0.5), SPS(1..3) = 1.0, 0.5, 0.45.

    Throughput for one request: verify 0 -> 1.0; verify 1 -> 0.5 (1 + 0.9) = 0.95; verify 2 ->
    0.45 (1 + 0.9 + 0.9 c2), which is 1.2195 if x1 = 0 (c2 = 0.9) and 0.8955 if x1 = 1.
    Early stop: admitting position 1 lowers throughput, so it never looks at c2 and verifies
    nothing; the first token is the bonus, exactly (0.7, 0.3).
    Global search: verifies both positions exactly when x1 = 0, which is then always accepted
    (p/q = 1.4), else nothing. So P(first = 0) = 0.5 + 0.5 * 0.7 = 0.85: position 1 was admitted
    because of the token drafted there, which biases the output to (0.85, 0.15).
    """
    sps = SPSTable((1, 2, 3), (1.0, 0.5, 0.45))
    n = 4000
    out, _, lens = _simulate(n, sps, early_stop=True, seed=11)
    assert lens.tolist() == [0] * n
    assert chi2_pvalue(out[:, 0], TARGET) > 1e-3

    out, _, lens = _simulate(n, sps, early_stop=False, seed=11)
    assert set(lens.tolist()) == {0, 2}
    assert chi2_pvalue(out[:, 0], TARGET) < 1e-6
    assert abs((out[:, 0] == 0).double().mean().item() - 0.85) < 0.02


def test_early_stop_with_token_dependent_admission_stays_lossless():
    """SPS(1..3) = 1.0, 0.9, 0.85: position 1 is always admitted (1.0 -> 1.71) and position 2
    only when x1 = 0 (0.85 * 2.71 = 2.3035 > 1.71; 0.85 * 1.99 = 1.6915 < 1.71). That decision
    reads c2, which depends on x1, but x1 is inside the window, so it stays lossless: the first
    two committed tokens are i.i.d. (0.7, 0.3).
    """
    sps = SPSTable((1, 2, 3), (1.0, 0.9, 0.85))
    n = 8000
    out, num, lens = _simulate(n, sps, early_stop=True, seed=21)
    assert set(lens.tolist()) == {1, 2}
    # When only one token was committed, the next round (empty draft here) samples the target.
    torch.manual_seed(22)
    nxt = torch.multinomial(TARGET, n, replacement=True)
    second = torch.where(num >= 2, out[:, 1], nxt)
    assert chi2_pvalue(out[:, 0] * 2 + second, torch.outer(TARGET, TARGET).reshape(-1)) > 1e-3
