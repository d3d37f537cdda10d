"""Committed target hidden rows a drafter has not folded into its context yet.

A drafter keeps per-request context (the MTP layer's K/V, the block drafters' projected context)
that every committed token extends. Extending it costs a drafter forward over the new rows, so a
step that does not draft for a request (the draft gate decided it does not pay) would still pay
for it. Instead `update` only records the rows here, and `propose` folds in the pending rows of
the requests it drafts for, all of them in one batched call, before drafting. The context a
request drafts from is the same as if it had been extended every step, so drafts, and outputs,
are unchanged; only when the work happens moves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specserve.core import Request
from specserve.speculative.base import CatchUp


@dataclass
class PendingRows:
    """One request's rows at positions start .. end - 1, in order."""

    start: int
    end: int
    rows: list[torch.Tensor]


class DeferredRows:
    """Per request, the contiguous run of committed hidden rows not yet in the drafter's
    context (`Drafter.update` records, `take` hands them over)."""

    def __init__(self) -> None:
        self.pending: dict[str, PendingRows] = {}

    def add(self, requests: list[Request], hidden: list[torch.Tensor | None]) -> None:
        """Record `Drafter.update`'s rows: request r's rows end at r.num_computed_tokens."""
        for req, h in zip(requests, hidden, strict=True):
            if h is None or h.shape[0] == 0 or req.finished:
                continue
            start = req.num_computed_tokens - h.shape[0]
            p = self.pending.get(req.request_id)
            end = req.num_computed_tokens
            if p is not None and p.end == start:
                p.rows.append(h)
                p.end = end
            elif p is not None and p.start < start < p.end:  # a replay: keep the rows before it
                p.rows, p.end = [torch.cat(p.rows)[: start - p.start], h], end
            else:  # nothing pending, or a replay from before the pending rows
                self.pending[req.request_id] = PendingRows(start, end, [h])

    def take(self, requests: list[Request]) -> list[tuple[Request, int, torch.Tensor]]:
        """Remove and return (request, first position, rows [n, width]) of those of `requests`
        that have pending rows, in their order."""
        out = []
        for req in requests:
            p = self.pending.pop(req.request_id, None)
            if p is not None:
                out.append((req, p.start, p.rows[0] if len(p.rows) == 1 else torch.cat(p.rows)))
        return out

    def fold(
        self,
        requests: list[Request],
        forward: Callable[[list[tuple[Request, int, torch.Tensor]]], None],
    ) -> CatchUp:
        """`take` the pending rows of `requests` and hand them to the drafter's `forward` (which
        folds them into its context), timed."""
        start = time.perf_counter()
        pending = self.take(requests)
        if pending:
            forward(pending)
        return CatchUp(sum(h.shape[0] for _, _, h in pending), time.perf_counter() - start)

    def drop(self, request_id: str) -> None:
        self.pending.pop(request_id, None)
