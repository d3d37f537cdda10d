"""Random anchor positions for packed block training.

A block drafted at anchor a predicts the tokens at a+1 .. a+K from the anchor token and the
target's hidden states of positions < a. Anchors are drawn without replacement from the
positions whose first label is target-generated (a >= prompt_len - 1) and which have at least
one label (a <= T - 2); sequences with fewer such positions get padding anchors (mask False).
"""

from __future__ import annotations

import torch


def sample_anchors(
    batch: int, seq_len: int, prompt_len: int, num_anchors: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> anchors [B, A] long (sorted per row), anchor_mask [B, A] bool."""
    lo, hi = max(1, prompt_len - 1), seq_len - 2
    choices = hi - lo + 1
    if choices <= 0:
        raise ValueError(f"no anchor positions: prompt_len {prompt_len}, seq_len {seq_len}")
    take = min(num_anchors, choices)
    scores = torch.rand(batch, choices, generator=generator)
    picked = scores.topk(take, dim=1).indices.sort(dim=1).values + lo
    anchors = torch.zeros(batch, num_anchors, dtype=torch.long)
    anchors[:, :take] = picked
    mask = torch.zeros(batch, num_anchors, dtype=torch.bool)
    mask[:, :take] = True
    return anchors, mask
