"""Random anchor positions for packed block training.

A block drafted at anchor a predicts the tokens at a+1 .. a+K from the anchor token and the
target's hidden states of positions < a. Anchors are drawn without replacement from the
positions whose first label is target-generated (a >= prompt_len - 1) and which have at least
one label (a <= T - 2); sequences with fewer such positions get padding anchors (mask False).
Prompt and sequence lengths may differ per row (pooled data sets of several prompt lengths,
right-padded to one width).
"""

from __future__ import annotations

import torch


def sample_anchors(
    batch: int,
    seq_len: int | torch.Tensor,
    prompt_len: int | torch.Tensor,
    num_anchors: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> anchors [B, A] long (sorted per row), anchor_mask [B, A] bool. `seq_len` and
    `prompt_len`: one length, or one per row [B]."""
    seq_len = torch.as_tensor(seq_len).expand(batch)
    prompt_len = torch.as_tensor(prompt_len).expand(batch)
    lo, hi = (prompt_len - 1).clamp_min(1), seq_len - 2
    if (hi < lo).any():
        raise ValueError(f"no anchor positions: prompt_len {prompt_len}, seq_len {seq_len}")
    width = int(hi.max()) + 1
    pos = torch.arange(width)
    allowed = (pos >= lo[:, None]) & (pos <= hi[:, None])
    scores = torch.rand(batch, width, generator=generator).masked_fill(~allowed, -1.0)
    take = min(num_anchors, width)
    top = scores.topk(take, dim=1)
    mask = top.values >= 0
    picked = torch.where(mask, top.indices, width)  # padding anchors sort last
    order = picked.sort(dim=1).values
    anchors = torch.zeros(batch, num_anchors, dtype=torch.long)
    anchors[:, :take] = torch.where(order < width, order, 0)
    amask = torch.zeros(batch, num_anchors, dtype=torch.bool)
    amask[:, :take] = order < width
    return anchors, amask
