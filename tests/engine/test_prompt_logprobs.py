"""Prompt logprobs (scoring, OpenAI `echo`): every prompt token after the first gets
`transformers`' log-softmax of the token, whatever the prefill chunking, prefix cache or
preemption."""

from __future__ import annotations

import pytest
import torch
import transformers

from specserve.core import SamplingParams
from specserve.llm import LLM

PROMPT = list(range(5, 45))


@pytest.fixture(scope="module")
def hf_logprobs(tiny_model_path) -> torch.Tensor:
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(ref.eval()(torch.tensor([PROMPT])).logits[0].float(), dim=-1)


def _check(entries, hf_logprobs, k: int) -> None:
    assert [t for t, _, _ in entries] == PROMPT
    assert entries[0][1] is None and entries[0][2] == []
    want = hf_logprobs[:-1].gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0]
    got = torch.tensor([lp for _, lp, _ in entries[1:]])
    assert (got - want).abs().max().item() <= 1e-4
    for pos, (_, _, top) in enumerate(entries[1:]):
        vals, ids = hf_logprobs[pos].topk(k)
        assert [t for t, _ in top] == ids.tolist()
        assert torch.allclose(torch.tensor([v for _, v in top]), vals, atol=1e-4)


@pytest.mark.parametrize("chunk", [7, 64])
def test_prompt_logprobs_match_transformers(tiny_model_path, hf_logprobs, chunk):
    llm = LLM(tiny_model_path, max_total_tokens=1024, page_size=4, chunked_prefill_size=chunk)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    out = llm.generate(PROMPT, params)[0]
    _check(out.prompt_logprobs, hf_logprobs, 3)
    # the generated tokens are the same as without scoring
    plain = llm.generate(PROMPT, SamplingParams(max_tokens=2, temperature=0))[0]
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids
    assert plain.prompt_logprobs is None


def test_prefix_cache_does_not_skip_scored_tokens(tiny_model_path, hf_logprobs):
    llm = LLM(tiny_model_path, max_total_tokens=1024, page_size=4, enable_prefix_caching=True)
    llm.generate(PROMPT, SamplingParams(max_tokens=1))  # fills the prefix cache
    out = llm.generate(PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    _check(out.prompt_logprobs, hf_logprobs, 0)
    assert out.meta_info[0]["cached_tokens"] == 0


def test_preempted_request_scores_each_token_once(tiny_model_path, hf_logprobs):
    """KV for only a few requests: later ones preempt earlier ones mid-way and recompute."""
    llm = LLM(tiny_model_path, num_blocks=40, page_size=4, chunked_prefill_size=16)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate([PROMPT] * 4, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for out in outs:
        _check(out.prompt_logprobs, hf_logprobs, 1)
