"""Per-request draft context of the block drafters: each draft layer's projected K/V of every
committed position, grown as the target commits tokens, and stacked for a batch."""

from __future__ import annotations

import torch


class ContextCache:
    """One request's projected context per draft layer (a tuple of row-aligned tensors: (K, V),
    or (K=V,) for DeepSeek-V4 stages), with the position of each row. `max_rows`: keep only the
    latest rows (a drafter with a sliding window reads no more); None keeps all.

    The rows live in buffers that grow by doubling, so a round's few new rows are one copy, not
    a concatenation of the whole context; `kv` gives contiguous views of the live rows."""

    def __init__(self, max_rows: int | None = None) -> None:
        self.buffers: list[tuple[torch.Tensor, ...]] = []
        self.positions = torch.zeros(0, dtype=torch.long)
        self.start = 0  # first live row of the buffers (rows before it fell out of max_rows)
        self.max_rows = max_rows

    @property
    def kv(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer the live rows, [L, ...] each (contiguous views)."""
        end = self.start + self.positions.shape[0]
        return [tuple(t[self.start : end] for t in layer) for layer in self.buffers]

    def add(self, kv: list[tuple[torch.Tensor, ...]], positions: torch.Tensor) -> None:
        """Append rows; rows at positions >= positions[0] are replaced (replay after preemption)."""
        positions = positions.cpu()
        keep = int((self.positions < positions[0]).sum())  # positions ascend: a prefix stays
        n, live = positions.shape[0], self.kv
        if not self.buffers or self.start + keep + n > self.buffers[0][0].shape[0]:
            capacity = max(2 * (keep + n), 64)
            self.buffers = [
                tuple(t.new_empty(capacity, *t.shape[1:]) for t in layer) for layer in kv
            ]
            for old, new in zip(live, self.buffers, strict=False):
                for a, b in zip(old, new, strict=True):
                    b[:keep].copy_(a[:keep])
            self.start = 0
        for rows, layer in zip(kv, self.buffers, strict=True):
            for a, b in zip(rows, layer, strict=True):
                b[self.start + keep : self.start + keep + n].copy_(a)
        self.positions = torch.cat([self.positions[:keep], positions])
        if self.max_rows is not None and self.positions.shape[0] > self.max_rows:
            cut = self.positions.shape[0] - self.max_rows
            self.start += cut
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
