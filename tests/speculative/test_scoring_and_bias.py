"""Scoring and logit_bias under speculative decoding: prompt logprobs never draft and equal the
plain engine's; logit_bias is applied to the target at every verified position, so greedy output
is identical to plain decoding and sampled output follows the biased target distribution."""

from __future__ import annotations

import pytest

from specserve.core import SamplingParams

from .conftest import PROMPTS, OracleDrafter, assert_kv_baseline, make_llm
from .test_distribution import _llm, _p_value, _samples


def test_scoring_never_drafts_and_matches_plain(bundle):
    plain = make_llm(bundle).generate(PROMPTS, SamplingParams(max_tokens=1, prompt_logprobs=2))
    llm = make_llm(bundle, "DSPARK", "full")
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, prompt_logprobs=2))
    assert llm.engine.stats.num_draft_tokens == 0
    for a, b in zip(plain, outs, strict=True):
        assert len(b.prompt_logprobs) == len(b.prompt_token_ids)
        for (ta, la, topa), (tb, lb, topb) in zip(
            a.prompt_logprobs, b.prompt_logprobs, strict=True
        ):
            assert ta == tb and [t for t, _ in topa] == [t for t, _ in topb]
            assert la is None if lb is None else abs(la - lb) <= 1e-4
    assert_kv_baseline(llm)


def test_scoring_then_drafting(bundle):
    """A scored prompt, then speculative decoding of the continuation: tokens as plain."""
    params = SamplingParams(max_tokens=16, temperature=0, prompt_logprobs=0)
    want = make_llm(bundle).generate(PROMPTS, params)
    llm = make_llm(bundle, "DSPARK", "full")
    got = llm.generate(PROMPTS, params)
    assert llm.engine.stats.num_accepted_tokens > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert [len(o.prompt_logprobs) for o in got] == [len(p) for p in PROMPTS]


@pytest.mark.parametrize("algorithm", ["NGRAM", "DSPARK"])
def test_greedy_with_logit_bias_identical_to_plain(bundle, algorithm):
    # push down the plain greedy choice at every position: a different, biased greedy path
    plain_tokens = make_llm(bundle).generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0))
    banned = {t for o in plain_tokens for t in o.outputs[0].token_ids[:3]}
    params = SamplingParams(
        max_tokens=12, temperature=0, logit_bias=tuple((t, -5.0) for t in sorted(banned))
    )
    want = [o.outputs[0].token_ids for o in make_llm(bundle).generate(PROMPTS, params)]
    assert want != [o.outputs[0].token_ids for o in plain_tokens]
    llm = make_llm(bundle, algorithm, "full")
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == want
    assert llm.engine.stats.num_draft_tokens > 0
    assert_kv_baseline(llm)


def _biased_samples(llm, bias):
    return _samples(llm, seed0=200_000, logit_bias=bias)


def test_sampled_logit_bias_follows_the_biased_target(bundle, peaked):
    """The oracle drafts from the unbiased target (q != biased p), so rejections must correct
    it; the bias must visibly change the distribution (else the test could not fail)."""
    plain_samples = _samples(_llm(bundle, peaked), seed0=0)
    top = max(set(plain_samples), key=plain_samples.count)[0]  # the commonest 2nd token
    bias = ((top, -2.0),)
    plain = _biased_samples(_llm(bundle, peaked), bias)
    assert _p_value(plain_samples, plain) < 1e-3
    llm = _llm(bundle, peaked)
    llm.engine.set_speculation(OracleDrafter(llm.engine.model, 2, "flat"), llm.engine.planner)
    spec = _biased_samples(llm, bias)
    assert 0 < llm.engine.stats.num_accepted_tokens < llm.engine.stats.num_draft_tokens
    assert _p_value(plain, spec) > 1e-3
