"""Continuous batching, chunked prefill, preemption, prefix caching and KV leak checks."""

from __future__ import annotations

import random

import pytest

from specserve.core import SamplingParams
from specserve.llm import LLM

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _prompts(n, seed=0, lo=3, hi=60):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """Each prompt generated alone: the ground truth for batched runs."""
    llm = LLM(tiny_model_path, max_total_tokens=8192, page_size=8, enable_prefix_caching=False)
    prompts = _prompts(12)
    return prompts, [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]


def _assert_no_leak(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_batched_equals_alone(tiny_model_path, reference):
    prompts, want = reference
    llm = LLM(tiny_model_path, max_total_tokens=8192, page_size=8)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == want
    _assert_no_leak(llm)


def test_chunked_prefill_and_running_limit(tiny_model_path, reference):
    prompts, want = reference
    llm = LLM(
        tiny_model_path,
        max_total_tokens=8192,
        page_size=8,
        chunked_prefill_size=16,
        max_running_requests=3,
    )
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == want
    _assert_no_leak(llm)


def test_requests_joining_mid_batch(tiny_model_path, reference):
    prompts, want = reference
    llm = LLM(tiny_model_path, max_total_tokens=8192, page_size=8)
    eng = llm.engine
    reqs, got, done = {}, {}, set()
    pending = list(enumerate(prompts))
    most_running = 0
    while pending or eng.has_unfinished():
        if pending:  # one new request every step
            i, p = pending.pop(0)
            reqs[eng.add_request(p, GREEDY).request_id] = i
        for out in eng.step():
            got.setdefault(reqs[out.request_id], []).extend(out.new_token_ids)
            if out.finished:
                done.add(reqs[out.request_id])
        most_running = max(most_running, len(eng.scheduler.running))
    assert done == set(range(len(prompts))) and most_running > 1
    assert [got[i] for i in range(len(prompts))] == want
    _assert_no_leak(llm)


def test_preemption_recomputes_identically(tiny_model_path, reference):
    prompts, want = reference
    # 12 prompts of up to ~84 tokens each in 160 KV slots: preemption must happen
    llm = LLM(tiny_model_path, max_total_tokens=160, page_size=8)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == want
    _assert_no_leak(llm)


def test_prefix_cache_hits_and_same_output(tiny_model_path):
    llm = LLM(tiny_model_path, max_total_tokens=4096, page_size=8)
    shared = list(range(10, 90))
    a = llm.generate(shared + [5, 6, 7], GREEDY)[0]
    bm = llm.engine.block_manager
    hits_before = bm.prefix_hit_tokens
    b = llm.generate(shared + [5, 6, 7], GREEDY)[0]
    assert bm.prefix_hit_tokens - hits_before == 80  # 10 full blocks of the 83-token prompt
    assert b.meta_info[0]["cached_tokens"] == 80
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    fresh = LLM(tiny_model_path, max_total_tokens=4096, page_size=8, enable_prefix_caching=False)
    c = fresh.generate(shared + [5, 6, 7], GREEDY)[0]
    assert c.outputs[0].token_ids == a.outputs[0].token_ids
    _assert_no_leak(llm)


def test_abort_frees_blocks(tiny_model_path):
    llm = LLM(tiny_model_path, max_total_tokens=4096, page_size=8)
    eng = llm.engine
    reqs = [eng.add_request(p, GREEDY) for p in _prompts(4, seed=3)]
    eng.step()
    eng.step()
    assert eng.block_manager.num_free_blocks < eng.block_manager.num_blocks
    for r in reqs:
        eng.abort(r.request_id)
    assert not eng.has_unfinished()
    _assert_no_leak(llm)


def test_prompt_larger_than_cache_is_refused(tiny_model_path):
    from specserve.engine.engine import RequestError

    llm = LLM(tiny_model_path, max_total_tokens=64, page_size=8)
    with pytest.raises(RequestError, match="context length"):
        llm.engine.add_request(list(range(100)), GREEDY)
