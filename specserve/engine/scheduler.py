"""Continuous batching: which requests run in the next forward, and how many tokens each.

Every step, running requests come first (decode tokens plus room for draft tokens, or the next
prefill chunk), then waiting requests are admitted while the token budget, the running-request
limit and free KV blocks allow. When blocks run out, the most recently admitted request is
preempted (its KV is dropped and recomputed later).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from specserve.config import SchedulerConfig
from specserve.core import Request, RequestStatus
from specserve.engine.block_manager import BlockManager


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens of the request itself (prefill chunk, or 1 when decoding)
    num_lookahead: int  # KV room reserved for draft tokens (decode only)

    @property
    def reaches_end(self) -> bool:
        """This step computes the request's last token, so it produces logits to sample from."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, num_lookahead: int = 0) -> tuple[list[ScheduledRequest], list[Request]]:
        """-> (what runs this step, the requests preempted to make room for it)."""
        budget = self.config.chunked_prefill_size
        out: list[ScheduledRequest] = []
        preempted: list[Request] = []
        for req in list(self.running):
            if req not in self.running:  # preempted by an earlier request of this loop
                continue
            decoding = not req.in_prefill
            n = 1 if decoding else min(req.num_tokens - req.num_computed_tokens, budget)
            # drafts past the last token the request may produce would only run positions
            # beyond its context (and past the model's RoPE table at the context's edge)
            left = req.max_new_tokens - len(req.output_token_ids) - 1
            look = min(num_lookahead, max(0, budget - n), max(0, left)) if decoding else 0
            if n <= 0 or n + look > budget:
                continue
            if not self._allocate_or_preempt(req, req.num_computed_tokens + n + look, preempted):
                continue
            out.append(ScheduledRequest(req, n, look))
            budget -= n + look
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            req = self.waiting[0]
            if not req.block_table:
                req.num_computed_tokens = req.num_cached_tokens = self.blocks.match_prefix(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.blocks.allocate(req, req.num_computed_tokens + n):
                if not self.running:  # nothing will ever free blocks: a prompt too large
                    raise MemoryError(f"{req.request_id}: not enough KV blocks for its prompt")
                self.blocks.free_request(req)
                req.num_computed_tokens = req.num_cached_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.append(ScheduledRequest(req, n, 0))
            budget -= n
        return out, preempted

    def _allocate_or_preempt(self, req: Request, num_tokens: int, preempted: list[Request]) -> bool:
        while not self.blocks.allocate(req, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        return True

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free_request(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks."""
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free_request(req)
