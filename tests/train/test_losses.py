import math

import torch

from specserve.train.losses import draft_loss, position_weights


def test_position_weights():
    w = position_weights(3)
    assert torch.allclose(w, torch.tensor([1.0, math.exp(-1 / 3), math.exp(-2 / 3)]))


def test_dspark_loss_matches_hand_computation():
    # One block of K = 2 slots over a vocabulary of 2.
    draft = torch.log(torch.tensor([[[0.5, 0.5], [0.8, 0.2]]]))  # [1, 2, 2]
    target = torch.log(torch.tensor([[[0.9, 0.1], [0.8, 0.2]]]))
    labels = torch.tensor([[0, 1]])
    valid = torch.tensor([[True, True]])
    conf = torch.tensor([[0.0, 2.0]])
    parts = draft_loss(draft, target, labels, valid, conf)
    w = [1.0, math.exp(-1 / 2)]
    ce = [-math.log(0.5), -math.log(0.2)]
    tv = [0.8, 0.0]  # |0.5-0.9| + |0.5-0.1|, identical distributions
    label_c = [1 - 0.4, 1.0]
    bce = [
        -(label_c[0] * math.log(0.5) + (1 - label_c[0]) * math.log(0.5)),
        -math.log(1 / (1 + math.exp(-2.0))),
    ]

    def mean(x):
        return (w[0] * x[0] + w[1] * x[1]) / (w[0] + w[1])

    assert math.isclose(parts.ce.item(), mean(ce), rel_tol=1e-5)
    assert math.isclose(parts.tv.item(), mean(tv), rel_tol=1e-5)
    assert math.isclose(parts.bce.item(), mean(bce), rel_tol=1e-5)
    want = 0.1 * mean(ce) + 0.9 * mean(tv) + 1.0 * mean(bce)
    assert math.isclose(parts.total.item(), want, rel_tol=1e-5)
    assert math.isclose(parts.accept.item(), 0.8, rel_tol=1e-5)


def test_invalid_slots_do_not_count_and_dflash_has_no_bce():
    draft = torch.log(torch.tensor([[[0.5, 0.5], [0.01, 0.99]]]))
    target = torch.log(torch.tensor([[[0.9, 0.1], [0.99, 0.01]]]))
    labels = torch.tensor([[0, 0]])
    parts = draft_loss(draft, target, labels, torch.tensor([[True, False]]))
    assert math.isclose(parts.tv.item(), 0.8, rel_tol=1e-5)
    assert math.isclose(parts.ce.item(), math.log(2), rel_tol=1e-5)
    assert parts.bce.item() == 0.0
    assert math.isclose(parts.total.item(), 0.1 * math.log(2) + 0.9 * 0.8, rel_tol=1e-5)
