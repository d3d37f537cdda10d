"""`draw`: one draft position for a batch of requests, greedy or sampled, reported exactly."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from specserve.core import Request, SamplingParams
from specserve.engine.sampler import probs_from_logits
from specserve.speculative.sampling import draw, proposal_probs


def _req(**params) -> Request:
    return Request([1, 2], SamplingParams(**params), 8)


def test_greedy_takes_the_argmax_with_a_one_hot_q():
    """All greedy: the argmax and no q at all (nobody reads it); next to a sampled request a
    greedy row's q is one-hot on its argmax."""
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 0.0, 0.0, 0.0]])
    tokens, q, conf = draw(logits, [_req(temperature=0), _req(temperature=0)])
    assert tokens.tolist() == [1, 0]
    assert q.shape == (2, 0)
    # the proxy is the softmax's max, not the one-hot's 1
    assert torch.allclose(conf, torch.softmax(logits, -1).max(-1).values)
    assert proposal_probs(q[0:1], _req(temperature=0)) is None
    tokens, q, conf = draw(logits, [_req(temperature=0), _req(temperature=1.0, seed=3)])
    assert tokens[0] == 1 and torch.equal(q[0], torch.eye(4)[1])
    assert torch.allclose(conf[0], torch.softmax(logits[0], -1).max())


def test_sampled_q_is_the_requests_own_transform():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    req = _req(temperature=0.7, top_k=3, seed=1)
    _, q, conf = draw(logits, [req])
    want = probs_from_logits(logits, [req.params])
    assert torch.allclose(q, want) and q[0, 3] == 0  # top_k removed the last token
    assert torch.allclose(conf, want.max(-1).values)
    row = q[0:1]
    assert proposal_probs(row, req) is row


def test_samples_follow_q():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    req = _req(temperature=1.0, seed=0)
    n = 4000
    counts = torch.zeros(4)
    for _ in range(n):
        tokens, q, _ = draw(logits, [req])
        counts[tokens[0]] += 1
    p = float(chisquare(counts.numpy(), (q[0] * n).numpy()).pvalue)
    assert p > 1e-3


def test_mixed_batch_and_seeded_reproducibility():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    a = [_req(temperature=0), _req(temperature=1.0, seed=5), _req(temperature=0.5, seed=9)]
    b = [_req(temperature=0), _req(temperature=1.0, seed=5), _req(temperature=0.5, seed=9)]
    ta, _, _ = draw(logits, a)
    tb, _, _ = draw(logits, b)
    assert torch.equal(ta, tb)  # the same seeds draw the same tokens
    assert int(ta[0]) == int(logits[0].argmax())
