"""Per-request draft context of the block drafters: each draft layer's projected K/V of every
committed position, grown as the target commits tokens, and stacked for a batch."""

from __future__ import annotations

import torch


class ContextCache:
    """One request's projected context per draft layer (a tuple of row-aligned tensors: (K, V),
    or (K=V,) for DeepSeek-V4 stages), with the position of each row. `max_rows`: keep only the
    latest rows (a drafter with a sliding window reads no more); None keeps all."""

    def __init__(self, max_rows: int | None = None) -> None:
        self.kv: list[tuple[torch.Tensor, ...]] = []
        self.positions = torch.zeros(0, dtype=torch.long)
        self.max_rows = max_rows

    def add(self, kv: list[tuple[torch.Tensor, ...]], positions: torch.Tensor) -> None:
        """Append rows; rows at positions >= positions[0] are replaced (replay after preemption)."""
        if self.kv:
            keep = self.positions < positions[0]
            if not bool(keep.all()):
                self.kv = [tuple(t[keep] for t in layer) for layer in self.kv]
                self.positions = self.positions[keep]
            self.kv = [
                tuple(torch.cat([a, b]) for a, b in zip(old, new, strict=True))
                for old, new in zip(self.kv, kv, strict=True)
            ]
            self.positions = torch.cat([self.positions, positions.cpu()])
        else:
            self.kv, self.positions = kv, positions.cpu()
        if self.max_rows is not None and self.positions.shape[0] > self.max_rows:
            cut = self.positions.shape[0] - self.max_rows
            self.kv = [tuple(t[cut:] for t in layer) for layer in self.kv]
            self.positions = self.positions[cut:]


def pad_stack(kvs: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request (k, v) [L_r, kv, d] -> (k, v) [R, Lmax, kv, d], zero padded."""
    lmax = max((k.shape[0] for k, _ in kvs), default=0)
    ref = kvs[0][0]
    out_k = ref.new_zeros(len(kvs), lmax, *ref.shape[1:])
    out_v = ref.new_zeros(len(kvs), lmax, *ref.shape[1:])
    for i, (k, v) in enumerate(kvs):
        out_k[i, : k.shape[0]] = k
        out_v[i, : v.shape[0]] = v
    return out_k, out_v
