"""`ContextCache` (rows in buffers that grow by doubling) keeps exactly the rows a plain
concatenation would: appends, replays from an earlier position, and the `max_rows` window."""

from __future__ import annotations

import pytest
import torch

from specserve.speculative.context_cache import ContextCache


@pytest.mark.parametrize("max_rows", [None, 10])
@pytest.mark.parametrize("width", [2, 1])  # (K, V), or (K=V,) as DeepSeek-V4 stages
def test_rows_equal_a_plain_concatenation(max_rows, width):
    gen = torch.Generator().manual_seed(0)
    cache, rows, pos, nxt = ContextCache(max_rows), None, torch.zeros(0, dtype=torch.long), 0
    for step in range(60):
        if step % 13 == 12:  # a replay (preemption): rows from an earlier position again
            nxt = max(0, nxt - 5)
        n = int(torch.randint(1, 8, (1,), generator=gen))
        new = [tuple(torch.randn(n, 2, 3, generator=gen) for _ in range(width)) for _ in range(2)]
        positions = torch.arange(nxt, nxt + n)
        cache.add(new, positions)
        keep = pos < nxt
        rows = (
            new
            if rows is None
            else [
                tuple(torch.cat([a[keep], b]) for a, b in zip(old, layer, strict=True))
                for old, layer in zip(rows, new, strict=True)
            ]
        )
        pos = torch.cat([pos[keep], positions])
        if max_rows is not None and pos.shape[0] > max_rows:
            rows = [tuple(t[-max_rows:] for t in layer) for layer in rows]
            pos = pos[-max_rows:]
        nxt += n
        assert torch.equal(cache.positions, pos)
        for got, want in zip(cache.kv, rows, strict=True):
            for g, w in zip(got, want, strict=True):
                assert g.is_contiguous() and torch.equal(g, w)
