"""Speculative decoding is lossless: greedy output is token-identical to plain decoding for every
algorithm and verify policy, and KV blocks always return to the baseline."""

from __future__ import annotations

import pytest
import torch

from specserve.core import SamplingParams
from specserve.testing.tiny import make_checkpoint

from .conftest import (
    ALGORITHMS,
    BLOCK,
    POLICIES,
    PROMPTS,
    OracleDrafter,
    TakeTurns,
    assert_kv_baseline,
    make_llm,
)

MAX_TOKENS = [20, 6, 12, 24, 8, 16]


def _params(**kw):
    return [SamplingParams(max_tokens=m, temperature=0, **kw) for m in MAX_TOKENS]


def _run_waves(llm, prompts, params):
    """Add requests in three waves while the engine runs (requests join mid-batch)."""
    eng = llm.engine
    reqs, waves = [], [range(0, 2), range(2, 4), range(4, len(prompts))]
    for wave in waves:
        for i in wave:
            reqs.append(eng.add_request(prompts[i], params[i]))
        for _ in range(3):
            eng.step()
    while eng.has_unfinished():
        eng.step()
    return [r.output_token_ids for r in reqs]


@pytest.fixture(scope="module")
def reference(bundle):
    llm = make_llm(bundle)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params())]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_greedy_identical_to_plain(bundle, reference, algorithm, policy):
    llm = make_llm(bundle, algorithm, policy)
    assert _run_waves(llm, PROMPTS, _params()) == reference
    assert_kv_baseline(llm)
    stats = llm.engine.stats
    assert stats.num_draft_tokens > 0
    if algorithm in ("NGRAM", "DSPARK"):  # these drafters are often right on this target
        assert stats.num_accepted_tokens > 0
    if policy == "full":  # one request at a time, too
        single = make_llm(bundle, algorithm, policy)
        for prompt, p, ref in zip(PROMPTS[:2], _params()[:2], reference, strict=False):
            assert single.generate(prompt, p)[0].outputs[0].token_ids == ref
        assert_kv_baseline(single)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_greedy_identical_when_requests_skip_drafting(bundle, reference, algorithm):
    """Requests draft on some steps and decode plainly on others, in the same steps as others
    that draft (the draft gate's decisions); the drafters fold in the skipped steps' context only
    when a request drafts again."""
    llm = make_llm(bundle, algorithm)
    turns = TakeTurns(every=3)
    llm.engine.set_speculation(llm.engine.drafter, turns)
    assert _run_waves(llm, PROMPTS, _params()) == reference
    assert_kv_baseline(llm)
    assert llm.engine.drafter.num_tracked_requests() == 0
    assert turns.mixed > 5 and llm.engine.stats.num_draft_tokens > 0


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_greedy_identical_with_the_cpp_attention_kernel(bundle, reference, algorithm):
    """Verify windows, rollbacks and joins through `--attention-backend cpp` against plain
    decoding on the pure PyTorch backend."""
    llm = make_llm(bundle, algorithm, attention_backend="cpp")
    if algorithm in ("DFLASH", "DSPARK"):  # greedy batches draft through the fused C++ step
        assert llm.engine.drafter.fused is not None
    if algorithm == "NEXTN":  # the MTP layer attends through the C++ `row_attention`
        assert llm.engine.drafter.kernel
    assert _run_waves(llm, PROMPTS, _params()) == reference
    assert_kv_baseline(llm)
    assert llm.engine.stats.num_draft_tokens > 0


@pytest.mark.parametrize(
    ("backend", "algorithms"), [("cpp", list(ALGORITHMS)), ("torch", ["DSPARK", "NEXTN"])]
)
def test_greedy_identical_with_a_16_bit_kv_cache(bundle, backend, algorithms):
    """`--kv-cache-dtype bfloat16` under the float32 target: every token's K/V is rounded once,
    when written, and read back the same by a decode step, a verify window or a prefill chunk,
    so speculation stays token-identical to plain decoding on the same cache."""
    kw = {"attention_backend": backend, "kv_cache_dtype": "bfloat16"}
    plain = make_llm(bundle, **kw)
    assert plain.engine.runner.kv_cache[0].dtype == torch.bfloat16
    want = _run_waves(plain, PROMPTS, _params())
    for algorithm in algorithms:
        llm = make_llm(bundle, algorithm, **kw)
        assert _run_waves(llm, PROMPTS, _params()) == want, algorithm
        assert_kv_baseline(llm)
        assert llm.engine.stats.num_draft_tokens > 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_exact_copy_of_target_is_always_accepted(bundle, temperature):
    llm = make_llm(bundle)
    llm.engine.set_speculation(OracleDrafter(llm.engine.model, BLOCK), llm.engine.planner)
    params = SamplingParams(max_tokens=21, temperature=temperature, seed=1)
    outs = llm.generate(PROMPTS[:3], params)
    stats = llm.engine.stats
    assert stats.num_drafts == stats.num_verify_passes
    if temperature == 0.0:
        assert stats.avg_accept_length == BLOCK + 1
        assert stats.accepted_per_position == [stats.num_drafts] * BLOCK
    else:  # q = p up to float rounding between the two forwards: min(1, p/q) ~ 1
        assert stats.avg_accept_length > 0.98 * (BLOCK + 1)
    for o in outs:
        assert o.meta_info[0]["spec_accept_length"] > 4.0
    assert_kv_baseline(llm)


def test_stop_string_and_stop_token_inside_accepted_block(bundle, reference):
    plain = make_llm(bundle)
    ref_out = plain.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0))[0]
    text = ref_out.outputs[0].text
    stop_str = text[len(text) // 2 : len(text) // 2 + 3]
    stop_tok = reference[0][9]
    cases = [
        SamplingParams(max_tokens=24, temperature=0, stop=(stop_str,)),
        SamplingParams(max_tokens=24, temperature=0, stop_token_ids=(stop_tok,)),
    ]
    for params in cases:
        want = plain.generate(PROMPTS[0], params)[0].outputs[0]
        for algorithm in ("NGRAM", "DSPARK", "oracle"):
            llm = make_llm(bundle, "NONE" if algorithm == "oracle" else algorithm)
            if algorithm == "oracle":
                llm.engine.set_speculation(
                    OracleDrafter(llm.engine.model, BLOCK), llm.engine.planner
                )
            got = llm.generate(PROMPTS[0], params)[0].outputs[0]
            assert (got.token_ids, got.text, got.finish_reason) == (
                want.token_ids,
                want.text,
                want.finish_reason,
            )
            assert got.finish_reason == "stop"
            assert_kv_baseline(llm)


def test_eos_inside_accepted_block(bundle, reference, tmp_path):
    eos = reference[0][10]
    target = make_checkpoint(tmp_path / "t", seed=0, eos_token_id=eos, init_std=0.2)
    plain = make_llm(bundle, target=target)
    want = plain.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
    assert want.finish_reason == "stop" and len(want.token_ids) <= 11
    llm = make_llm(bundle, target=target)
    llm.engine.set_speculation(OracleDrafter(llm.engine.model, BLOCK), llm.engine.planner)
    got = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
    assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)
    assert_kv_baseline(llm)


def test_request_ending_at_the_context_edge(bundle, tmp_path):
    """prompt + max_tokens = the model's whole context: drafts must stop at the last token the
    request may produce (a draft past it would run a position the RoPE table does not have)."""
    prompt = PROMPTS[2]  # 30 tokens
    target = make_checkpoint(tmp_path / "t", seed=0, max_position_embeddings=64)
    params = SamplingParams(max_tokens=64 - len(prompt), temperature=0, ignore_eos=True)
    want = make_llm(bundle, target=target).generate(prompt, params)[0].outputs[0]
    llm = make_llm(bundle, target=target)
    llm.engine.set_speculation(OracleDrafter(llm.engine.model, BLOCK), llm.engine.planner)
    got = llm.generate(prompt, params)[0].outputs[0]
    assert got.token_ids == want.token_ids and len(got.token_ids) == 64 - len(prompt)
    assert_kv_baseline(llm)


@pytest.mark.parametrize("algorithm", ["DSPARK", "NEXTN"])
def test_preemption_under_speculation(bundle, reference, algorithm):
    llm = make_llm(bundle, algorithm, max_total_tokens=128, page_size=16)
    outs = llm.generate(PROMPTS, _params())
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert_kv_baseline(llm)
    assert llm.engine.drafter.num_tracked_requests() == 0


@pytest.mark.parametrize("algorithm", ["DSPARK", "NEXTN"])
def test_abort_mid_flight_releases_everything(bundle, algorithm):
    llm = make_llm(bundle, algorithm)
    eng = llm.engine
    reqs = [
        eng.add_request(p, SamplingParams(max_tokens=30, temperature=1.0, seed=3)) for p in PROMPTS
    ]
    for _ in range(4):
        eng.step()
    assert eng.drafter.num_tracked_requests() == sum(not r.finished for r in reqs) > 0
    eng.abort(reqs[0].request_id)
    eng.abort(reqs[3].request_id)
    while eng.has_unfinished():
        eng.step()
    assert_kv_baseline(llm)
    assert eng.drafter.num_tracked_requests() == 0
