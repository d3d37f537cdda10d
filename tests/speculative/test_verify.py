"""Greedy verification by hand; rejection sampling against exact target distributions."""

import math

import pytest
import torch
from scipy.stats import chisquare

from specserve.speculative.verify import greedy_verify, rejection_verify

NAN = math.nan


def _t(rows):
    return torch.tensor(rows, dtype=torch.long)


def chi2_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """χ² goodness of fit of token ids [n] against exact probabilities [V]."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() / probs.double().sum() * tokens.numel()
    return float(chisquare(counts.numpy(), expected.numpy()).pvalue)


# ---------------------------------------------------------------- greedy


def test_greedy_hand_cases_in_one_batch():
    draft = _t([[5, 6, 7], [5, 6, 7], [1, 2, 3], [5, 6, -1], [5, 6, 3]])
    lens = _t([3, 3, 0, 2, 2])
    argmax = _t(
        [
            [5, 6, 7, 9],  # all accepted + bonus 9
            [5, 8, 7, 9],  # first mismatch at 1: target's 8 replaces it, later match ignored
            [4, 2, 3, 0],  # zero-length draft: just the target's next token
            [5, 6, 3, 9],  # padding (-1) ignored, bonus at position draft_lens = 2
            [5, 6, 3, 9],  # padding token equals target argmax but is not in the window
        ]
    )
    out, num = greedy_verify(draft, lens, argmax)
    assert out.tolist() == [
        [5, 6, 7, 9],
        [5, 8, -1, -1],
        [4, -1, -1, -1],
        [5, 6, 3, -1],
        [5, 6, 3, -1],
    ]
    assert num.tolist() == [4, 2, 1, 3, 3]


def test_greedy_first_position_mismatch_and_empty_window_batch():
    out, num = greedy_verify(_t([[3, 3]]), _t([2]), _t([[4, 3, 3]]))
    assert out.tolist() == [[4, -1, -1]] and num.tolist() == [1]
    out, num = greedy_verify(torch.zeros(2, 0, dtype=torch.long), _t([0, 0]), _t([[7], [8]]))
    assert out.tolist() == [[7], [8]] and num.tolist() == [1, 1]


# ---------------------------------------------------------------- rejection sampling

# A context-dependent target over V=3 and a drafter that disagrees with it everywhere.
P1 = torch.tensor([0.5, 0.3, 0.2])
P2 = torch.tensor([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])  # P2[y1] = p(y2 | y1)
P3 = torch.tensor([0.2, 0.2, 0.6])  # bonus after two accepted tokens (not measured)
Q1 = torch.tensor([0.2, 0.5, 0.3])
Q2 = torch.tensor([[0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])  # Q2[x1] = q(x2 | x1)


def _simulate_two_tokens(n: int, seed: int, one_hot: bool) -> torch.Tensor:
    """Run draft + verify rounds until two tokens are committed; returns [n, 2] first two tokens.

    Each trial drafts 0, 1 or 2 tokens (window chosen at random); padding holds -1 / NaN. If the
    first round commits only one token, a second round with an empty draft samples the next one,
    as the engine would.
    """
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 3, (n,), generator=g)
    if one_hot:  # deterministic proposals, e.g. an n-gram drafter: x1 = 1, x2 = (x1 + 1) % 3
        x1 = torch.ones(n, dtype=torch.long)
        x2 = (x1 + 1) % 3
        draft_probs = None
    else:
        x1 = torch.multinomial(Q1, n, replacement=True, generator=g)
        x2 = torch.multinomial(Q2[x1], 1, generator=g)[:, 0]
        draft_probs = torch.stack([Q1.expand(n, 3), Q2[x1]], dim=1)
    draft = torch.stack([x1, x2], dim=1)
    target = torch.stack([P1.expand(n, 3), P2[x1], P3.expand(n, 3)], dim=1).clone()
    pos = torch.arange(2)[None, :]
    draft = torch.where(pos < lens[:, None], draft, -1)
    target[torch.arange(3)[None, :] > lens[:, None]] = NAN
    if draft_probs is not None:
        draft_probs = draft_probs.clone()
        draft_probs[pos.expand(n, 2) >= lens[:, None]] = NAN

    torch.manual_seed(seed + 1)
    out, num = rejection_verify(draft, lens, draft_probs, target, [None] * n)
    assert bool(((num >= 1) & (num <= lens + 1)).all())
    assert bool((out[torch.arange(3)[None, :] >= num[:, None]] == -1).all())
    y1 = out[:, 0]
    second, _ = rejection_verify(
        torch.zeros(n, 0, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, 0, 3),
        P2[y1][:, None, :],
        [None] * n,
    )
    y2 = torch.where(num >= 2, out[:, 1], second[:, 0])
    return torch.stack([y1, y2], dim=1)


def _joint_chi2(tokens: torch.Tensor) -> float:
    return chi2_pvalue(tokens[:, 0] * 3 + tokens[:, 1], (P1[:, None] * P2).reshape(-1))


@pytest.mark.parametrize("one_hot", [False, True])
def test_rejection_first_and_second_tokens_follow_target(one_hot):
    tokens = _simulate_two_tokens(20000, seed=1234, one_hot=one_hot)
    assert _joint_chi2(tokens) > 1e-3


def test_chi2_check_detects_a_wrong_sampler():
    """The χ² check above has power: accepting every draft (no rejection) fails it."""
    g = torch.Generator().manual_seed(5)
    x1 = torch.multinomial(Q1, 20000, replacement=True, generator=g)
    x2 = torch.multinomial(Q2[x1], 1, generator=g)[:, 0]
    assert _joint_chi2(torch.stack([x1, x2], dim=1)) < 1e-6


def test_draft_equal_to_target_is_always_fully_accepted():
    n, k = 500, 4
    g = torch.Generator().manual_seed(0)
    target = torch.softmax(torch.randn(n, k + 1, 11, generator=g), dim=-1)
    draft = torch.multinomial(target[:, :k].reshape(-1, 11), 1, generator=g).view(n, k)
    lens = torch.randint(0, k + 1, (n,), generator=g)
    out, num = rejection_verify(draft, lens, target[:, :k].clone(), target, [None] * n)
    assert num.tolist() == (lens + 1).tolist()
    window = torch.arange(k)[None, :] < lens[:, None]
    assert bool((out[:, :k][window] == draft[window]).all())


def test_zero_probability_draft_token_is_rejected():
    """q(x) = 0 cannot have been sampled: always rejected, then sampled from max(p - q, 0)."""
    n = 1000
    draft = torch.full((n, 1), 2)
    q = torch.tensor([0.5, 0.5, 0.0]).expand(n, 1, 3)
    p = torch.tensor([[0.2, 0.4, 0.4], [1.0, 0.0, 0.0]]).expand(n, 2, 3)
    out, num = rejection_verify(draft, torch.ones(n, dtype=torch.long), q, p, [None] * n)
    assert num.tolist() == [1] * n
    assert out[:, 0].tolist() == [2] * n  # residual (0, 0, 0.4)


def test_zero_residual_falls_back_to_target():
    """Forced rejection with p == q: max(p - q, 0) is all zeros, so the token comes from p."""
    n = 4000
    draft = torch.full((n, 1), 2)
    pq = torch.tensor([0.5, 0.5, 0.0])
    torch.manual_seed(3)
    out, num = rejection_verify(
        draft, torch.ones(n, dtype=torch.long), pq.expand(n, 1, 3), pq.expand(n, 2, 3), [None] * n
    )
    assert num.tolist() == [1] * n
    counts = torch.bincount(out[:, 0], minlength=3)
    assert counts[2] == 0
    assert chisquare(counts[:2].numpy()).pvalue > 1e-3


def test_zero_length_drafts_sample_the_bonus():
    n = 6000
    bonus = torch.tensor([0.1, 0.6, 0.3])
    target = torch.full((n, 3, 3), NAN)
    target[:, 0] = bonus
    torch.manual_seed(4)
    out, num = rejection_verify(
        torch.full((n, 2), -1), torch.zeros(n, dtype=torch.long), None, target, [None] * n
    )
    assert num.tolist() == [1] * n
    assert bool((out[:, 1:] == -1).all())
    assert chi2_pvalue(out[:, 0], bonus) > 1e-3


def _one_request(k: int):
    draft = torch.tensor([[0, 1, 2, 0][:k]])
    q = torch.softmax(torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]), -1)
    p = torch.softmax(torch.tensor([[0.5, 0.5, 0.0]]), -1).expand(k + 1, 3)
    return draft, q[None, :k], p[None]


def test_seeded_generator_is_reproducible_and_independent_of_the_batch():
    draft, q, p = _one_request(3)
    lens = torch.tensor([3])
    results = []
    for seed in range(40):
        a = rejection_verify(draft, lens, q, p, [torch.Generator().manual_seed(seed)])
        b = rejection_verify(draft, lens, q, p, [torch.Generator().manual_seed(seed)])
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        # Same request next to a longer, unseeded one: same result for this seed.
        other_draft = torch.tensor([[2, 2, 2, 2, 2]])
        other_q = torch.full((1, 5, 3), 1 / 3)
        other_p = torch.full((1, 6, 3), 1 / 3)
        batch = rejection_verify(
            torch.cat([torch.nn.functional.pad(draft, (0, 2), value=-1), other_draft]),
            torch.tensor([3, 5]),
            torch.cat([torch.nn.functional.pad(q, (0, 0, 0, 2)), other_q]),
            torch.cat([torch.nn.functional.pad(p, (0, 0, 0, 2)), other_p]),
            [torch.Generator().manual_seed(seed), None],
        )
        assert batch[1][0] == a[1][0]
        assert batch[0][0, :4].tolist() == a[0][0].tolist()
        results.append((tuple(a[0][0].tolist()), int(a[1][0])))
    assert len(set(results)) > 3  # different seeds do give different outcomes


def test_generator_list_length_is_checked():
    draft, q, p = _one_request(2)
    with pytest.raises(ValueError, match="one generator entry per request"):
        rejection_verify(draft, torch.tensor([2]), q, p, [])
