"""Scheduler unit tests over a real BlockManager, no model: budgets, limits, preemption."""

from __future__ import annotations

import pytest

from specserve.config import SchedulerConfig
from specserve.core import Request, RequestStatus, SamplingParams
from specserve.engine.block_manager import BlockManager
from specserve.engine.scheduler import Scheduler


def _req(n: int, rid: str) -> Request:
    return Request(list(range(3, 3 + n)), SamplingParams(max_tokens=8), 8, request_id=rid)


def _scheduler(blocks: int = 64, budget: int = 64, running: int = 8) -> Scheduler:
    cfg = SchedulerConfig(max_running_requests=running, chunked_prefill_size=budget)
    return Scheduler(cfg, BlockManager(blocks, 4, enable_prefix_caching=False))


def _commit(scheduled) -> None:
    """What the engine does after a forward: count the computed tokens, sample one on the end."""
    for s in scheduled:
        s.request.num_computed_tokens += s.num_new_tokens
        if s.reaches_end:
            s.request.output_token_ids.append(7)


def test_prefill_is_chunked_under_the_token_budget():
    sched = _scheduler(budget=16)
    a, b = _req(20, "a"), _req(10, "b")
    sched.add(a)
    sched.add(b)
    out, preempted = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out] == [("a", 16)]
    assert not out[0].reaches_end and preempted == []
    _commit(out)
    out, _ = sched.schedule()
    # a finishes its prompt (4 tokens), b gets the rest of the budget (10 of 12)
    assert [(s.request.request_id, s.num_new_tokens) for s in out] == [("a", 4), ("b", 10)]
    assert all(s.reaches_end for s in out)


def test_decode_reserves_lookahead_for_draft_tokens():
    sched = _scheduler()
    a = _req(5, "a")
    sched.add(a)
    _commit(sched.schedule(num_lookahead=3)[0])
    out, _ = sched.schedule(num_lookahead=3)
    assert (out[0].num_new_tokens, out[0].num_lookahead) == (1, 3)
    # KV room for the decode token and three drafts: 6 committed + 1 + 3 = 10 tokens, 3 blocks
    assert len(a.block_table) == 3


def test_lookahead_stops_at_the_last_token_the_request_may_produce():
    """A request 2 tokens from max_tokens gets room for 1 draft (1 accepted + the bonus token
    end it): a second could only run a position past its end, and past the model's RoPE table
    when the request ends at the context's edge."""
    sched = _scheduler()
    a = _req(5, "a")  # max_tokens 8
    sched.add(a)
    _commit(sched.schedule(num_lookahead=3)[0])  # the prompt's KV
    a.output_token_ids.extend([7] * 6)  # 6 of 8 produced, all but the last have KV
    a.num_computed_tokens += 5
    assert sched.schedule(num_lookahead=3)[0][0].num_lookahead == 1
    a.output_token_ids.append(7)  # 7 of 8: the next token is the last, nothing to draft
    a.num_computed_tokens += 1
    assert sched.schedule(num_lookahead=3)[0][0].num_lookahead == 0


def test_running_limit_keeps_the_rest_waiting():
    sched = _scheduler(running=2)
    for rid in "abc":
        sched.add(_req(4, rid))
    out, _ = sched.schedule()
    assert [s.request.request_id for s in out] == ["a", "b"]
    assert [r.request_id for r in sched.waiting] == ["c"]
    assert sched.running[0].status == RequestStatus.RUNNING


def test_schedule_returns_the_requests_it_preempts():
    sched = _scheduler(blocks=4, budget=64)  # 16 KV slots
    a, b = _req(7, "a"), _req(7, "b")
    sched.add(a)
    sched.add(b)
    _commit(sched.schedule()[0])  # both prefilled: 2 blocks each, all blocks used
    assert sched.blocks.num_free_blocks == 0
    out, preempted = sched.schedule(num_lookahead=2)  # a needs a third block: b makes room
    assert preempted == [b] and [s.request for s in out] == [a]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and not b.block_table
    assert sched.num_preemptions == 1 and b.num_preemptions == 1


def test_finish_frees_blocks_wherever_the_request_is():
    sched = _scheduler()
    a, b = _req(6, "a"), _req(6, "b")
    sched.add(a)
    sched.schedule()
    sched.add(b)
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    sched.finish(b, RequestStatus.FINISHED_ABORTED)
    assert not sched.has_work()
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks


def test_a_prompt_larger_than_the_cache_is_an_error():
    sched = _scheduler(blocks=2)
    sched.add(_req(20, "a"))
    with pytest.raises(MemoryError, match="not enough KV blocks"):
        sched.schedule()
