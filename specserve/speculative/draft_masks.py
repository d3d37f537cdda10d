"""Attention masks of the block drafters (True = may attend), over keys [context; block].

Training packs A blocks of K slots per sequence: block a sees the context strictly before its
anchor and itself (bidirectionally). Inference drafts one block per request over that request's
context, padded to the longest in the batch.
"""

from __future__ import annotations

import torch


def safe_anchors(
    anchors: torch.Tensor, anchor_mask: torch.Tensor | None, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding anchors (mask False) become 0; all anchors clamped into [0, seq_len)."""
    if anchor_mask is None:
        anchor_mask = torch.ones_like(anchors, dtype=torch.bool)
    return torch.where(anchor_mask, anchors, 0).clamp(0, seq_len - 1), anchor_mask


def training_mask(anchors: torch.Tensor, seq_len: int, k: int) -> torch.Tensor:
    """Block-sparse mask [B, 1, A*K, T + A*K]: block a sees context < anchors[b, a] and itself."""
    b, a = anchors.shape
    dev = anchors.device
    q_block = torch.arange(a * k, device=dev) // k  # [Q]
    anchor_of_q = anchors[:, q_block]  # [B, Q]
    ctx = torch.arange(seq_len, device=dev)[None, None, :] < anchor_of_q[:, :, None]
    kv_block = torch.arange(a * k, device=dev) // k
    own = (q_block[:, None] == kv_block[None, :]).expand(b, -1, -1)
    return torch.cat([ctx, own], dim=2).unsqueeze(1)


def draft_mask(context_lens: torch.Tensor, max_len: int, k: int) -> torch.Tensor:
    """One block of k slots per request over zero-padded contexts: context_lens [R] ->
    [R, 1, k, max_len + k] (the request's own context rows and the whole block)."""
    ar = torch.arange(max_len + k, device=context_lens.device)
    mask = (ar[None, :] < context_lens[:, None]) | (ar[None, :] >= max_len)  # [R, L + k]
    return mask[:, None, None, :].expand(context_lens.shape[0], 1, k, max_len + k)
