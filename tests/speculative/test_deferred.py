"""Drafters defer their context upkeep to the steps that draft: a step that decodes a request
plainly runs no drafter work for it, and the rows it skipped are folded in, in one call, when the
request drafts again."""

from __future__ import annotations

import pytest
import torch

from specserve.core import Request, SamplingParams
from specserve.speculative.deferred import DeferredRows
from specserve.speculative.planner import Planner

from .conftest import PROMPTS, make_llm


def _req(rid: str, computed: int) -> Request:
    r = Request(list(range(1, 41)), SamplingParams(max_tokens=8), 8, request_id=rid)
    r.num_computed_tokens = computed
    return r


def _rows(first: int, n: int) -> torch.Tensor:
    return torch.arange(first, first + n, dtype=torch.float32)[:, None]


def test_rows_accumulate_in_order_and_a_replay_replaces_the_tail():
    d = DeferredRows()
    d.add([_req("a", 10), _req("b", 3)], [_rows(0, 10), _rows(0, 3)])
    d.add([_req("a", 12), _req("b", 3)], [_rows(10, 2), None])
    d.add([_req("a", 13)], [_rows(12, 1)])
    d.add([_req("a", 13)], [_rows(11, 2) + 100])  # positions 11, 12 computed again
    ((req, start, rows),) = d.take([_req("a", 13)])
    assert req.request_id == "a" and start == 0
    assert rows[:, 0].tolist() == [*range(11), 111.0, 112.0]
    assert list(d.pending) == ["b"]
    d.drop("b")
    assert d.take([_req("b", 3)]) == []


class _Never(Planner):
    def allow(self, requests, num_decoding=None, context_tokens=0):
        return [False] * len(requests)


@pytest.mark.parametrize("algorithm", ["NEXTN", "DFLASH", "DSPARK"])
def test_a_plain_step_runs_no_drafter_work(bundle, algorithm):
    llm = make_llm(bundle, algorithm)
    eng, drafter = llm.engine, llm.engine.drafter
    planner = eng.planner
    eng.set_speculation(drafter, _Never())
    reqs = [eng.add_request(p, SamplingParams(max_tokens=12, temperature=0)) for p in PROMPTS[:3]]
    for _ in range(5):
        eng.step()
    context = drafter.states if algorithm == "NEXTN" else drafter.contexts
    assert not context  # no drafter forward ran
    for r in reqs:  # every computed row waits, from position 0
        pending = drafter.deferred.pending[r.request_id]
        assert (pending.start, pending.end) == (0, r.num_computed_tokens)
    eng.planner = planner  # drafting again: one catch-up, then the drafts
    before = {r.request_id: r.num_computed_tokens for r in reqs}
    eng.step()
    assert set(context) == set(before)  # folded in; only this step's own rows wait
    assert {rid: p.start for rid, p in drafter.deferred.pending.items()} == before
    assert eng.stats.num_draft_tokens > 0
