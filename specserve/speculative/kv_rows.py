"""Per-request K/V rows of a one-layer drafter (the MTP module) and the attention of new rows
over them, for all requests in one call.

`KVRows` keeps one request's keys and values [kv, capacity, d] (head-major: a head's rows are
one stream for the kernel) in buffers that double when full (`ContextCache`'s idea): a round's
new rows are written in place, never a concatenation of the whole context. Rows past `length`
are scratch: a draft chain writes its temporary rows there, and they are gone when the chain
ends because `length` never counted them (no rollback needed).

`RowAttention` is the `AttentionContext` of one forward over R requests with Q_r new rows each
(any Q_r: a catch-up after a prefix-cache hit or a replay, one row per chain step). It writes
request r's new K/V at rows `starts[r]` .. of its buffers, and new row j sees rows
0 .. starts[r] + j. With `kernel` (the C++ kernels are loaded and the rows are float32 on the
CPU: `--attention-backend cpp`) that is one call of `torch.ops.specserve.row_attention`
(`kernels/row_attention.cpp`) reading every request's rows in place; otherwise one SDPA per
request over a view of its rows. Each forward advances `starts` past the rows it wrote, so the
next forward through the same context (the chain's next step) sees them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specserve.models.attention import AttentionContext

MIN_ROWS = 64  # the smallest buffer


class KVRows:
    """One request's K and V rows of one layer: `length` committed rows, then scratch."""

    def __init__(self, num_kv_heads: int, head_dim: int, like: torch.Tensor) -> None:
        self.k = like.new_empty(num_kv_heads, 0, head_dim)  # [kv, capacity, d]
        self.v = like.new_empty(num_kv_heads, 0, head_dim)
        self.length = 0

    def reserve(self, rows: int) -> None:
        """Make room for `rows` rows in all, keeping the committed ones."""
        if rows <= self.k.shape[1]:
            return
        heads, _, d = self.k.shape
        capacity, n = max(2 * rows, MIN_ROWS), self.length
        k, v = self.k.new_empty(heads, capacity, d), self.v.new_empty(heads, capacity, d)
        k[:, :n].copy_(self.k[:, :n])
        v[:, :n].copy_(self.v[:, :n])
        self.k, self.v = k, v


class RowAttention(AttentionContext):
    """Request r's `query_lens[r]` new rows go to rows `starts[r]` .. of `rows[r]` (reserved by
    the caller) and attend causally over everything before them (see the module doc)."""

    def __init__(
        self, rows: list[KVRows], starts: list[int], query_lens: list[int], kernel: bool
    ) -> None:
        self.rows, self.kernel = rows, kernel
        self.starts = torch.tensor(starts, dtype=torch.long)
        self.query_lens = torch.tensor(query_lens, dtype=torch.long)

    def attend(self, layer_idx, q, k, v):
        if self.kernel:
            out = q.new_empty(q.shape)
            torch.ops.specserve.row_attention(
                out,
                q.contiguous(),
                k.contiguous(),
                v.contiguous(),
                [r.k for r in self.rows],
                [r.v for r in self.rows],
                self.starts,
                self.query_lens,
                q.shape[-1] ** -0.5,
            )
        else:
            out = self._attend_each(q, k, v)
        self.starts += self.query_lens
        return out

    def _attend_each(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The PyTorch path: one SDPA per request over a view of its rows."""
        out, first = [], 0
        for rows, start, n in zip(
            self.rows, self.starts.tolist(), self.query_lens.tolist(), strict=True
        ):
            end = start + n
            rows.k[:, start:end].copy_(k[first : first + n].transpose(0, 1))
            rows.v[:, start:end].copy_(v[first : first + n].transpose(0, 1))
            qi, keys, vals = q[first : first + n], rows.k[:, :end], rows.v[:, :end]
            causal = start == 0 and n > 1  # a prompt
            if causal:  # the fused causal kernel: 4-D, no GQA (heads repeated)
                groups = qi.shape[1] // keys.shape[0]
                keys, vals = keys.repeat_interleave(groups, 0), vals.repeat_interleave(groups, 0)
            o = F.scaled_dot_product_attention(
                qi.transpose(0, 1)[None],
                keys[None],
                vals[None],
                attn_mask=causal_after(start, n, q.device),
                is_causal=causal,
                enable_gqa=not causal,
            )
            out.append(o[0].transpose(0, 1))
            first += n
        return torch.cat(out)


def causal_after(prefix: int, n: int, device: torch.device) -> torch.Tensor | None:
    """[n, prefix + n] bool: row i sees the prefix and new rows 0..i; None where SDPA needs no
    mask (one row sees everything; no prefix: `is_causal`, the fused kernel, several times
    faster than the masked one on a 1,024-token prompt)."""
    if n == 1 or prefix == 0:
        return None
    cols = torch.arange(prefix + n, device=device)[None, :]
    return cols <= prefix + torch.arange(n, device=device)[:, None]
