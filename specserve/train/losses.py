"""Drafter training losses (DeepSpec recipe), as pure functions of logits and labels.

Every loss is a weighted mean over the valid draft slots of a batch of blocks `[..., K]`, with
position weights `w_k = exp(-(k-1)/gamma)` (k = 1 .. K; gamma defaults to K here, and drafter
training passes `--loss-decay-gamma`, DeepSpec's 4 for block 7): early slots matter more
because a later slot only counts when every earlier one was accepted.

* CE:  -log p_d(x_k), x_k the target-generated token.
* TV:  ||p_d - p_t||_1 against the target's distribution at the same position.
* BCE: confidence logit against the soft label c*_k = 1 - 1/2 ||p_d - p_t||_1 (p_d detached).

DSpark: 0.1 CE + 0.9 TV + 1.0 BCE. DFlash and MTP: CE + TV with the same weights, no BCE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DSPARK_WEIGHTS = {"ce": 0.1, "tv": 0.9, "bce": 1.0}
DFLASH_WEIGHTS = {"ce": 0.1, "tv": 0.9, "bce": 0.0}


def position_weights(k: int, gamma: float | None = None, device=None) -> torch.Tensor:
    """[K] weights exp(-(k-1)/gamma) for slots k = 1..K; gamma defaults to K."""
    gamma = float(gamma or k)
    return torch.exp(-torch.arange(k, device=device, dtype=torch.float32) / gamma)


def weighted_mean(values: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values, valid [..., K]; weights [K] -> sum(w * v over valid) / sum(w over valid)."""
    w = weights * valid.float()
    return (values * w).sum() / w.sum().clamp_min(1e-9)


def l1_distance(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """||softmax(draft) - softmax(target)||_1 over the last axis -> [...] in [0, 2]."""
    return (
        (F.softmax(draft_logits.float(), -1) - F.softmax(target_logits.float(), -1)).abs().sum(-1)
    )


@dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    tv: torch.Tensor
    bce: torch.Tensor
    accept: torch.Tensor  # mean of c* = 1 - TV/2: the expected per-slot acceptance (no grad)


def draft_loss(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    confidence_logits: torch.Tensor | None = None,
    weights: dict[str, float] | None = None,
    gamma: float | None = None,
) -> LossParts:
    """draft_logits, target_logits [..., K, V]; labels, valid [..., K]; confidence [..., K]."""
    weights = weights or (DSPARK_WEIGHTS if confidence_logits is not None else DFLASH_WEIGHTS)
    k = labels.shape[-1]
    w = position_weights(k, gamma, labels.device)
    logp = F.log_softmax(draft_logits.float(), -1)
    ce = -logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    tv = (logp.exp() - F.softmax(target_logits.float(), -1)).abs().sum(-1)
    label_c = (1.0 - 0.5 * tv).detach().clamp(0.0, 1.0)
    parts = {"ce": weighted_mean(ce, valid, w), "tv": weighted_mean(tv, valid, w)}
    if confidence_logits is not None:
        bce = F.binary_cross_entropy_with_logits(
            confidence_logits.float(), label_c, reduction="none"
        )
        parts["bce"] = weighted_mean(bce, valid, w)
    else:
        parts["bce"] = torch.zeros((), device=labels.device)
    total = sum(weights[name] * value for name, value in parts.items())
    accept = weighted_mean(label_c, valid, torch.ones_like(w))
    return LossParts(total, parts["ce"], parts["tv"], parts["bce"], accept)
