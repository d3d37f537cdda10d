"""Sampling parameters, stops, seeds, n and logprobs through the engine."""

from __future__ import annotations

import pytest
import torch

from specserve.core import SamplingParams, SamplingParamsError
from specserve.engine.sampler import probs_from_logits
from specserve.llm import LLM


@pytest.fixture(scope="module")
def llm(tiny_model_path):
    return LLM(tiny_model_path, max_total_tokens=8192, page_size=8)


PROMPT = [7, 100, 200, 300, 45]


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    a = llm.generate(PROMPT, p)[0].outputs[0].token_ids
    b = llm.generate([PROMPT, [1, 2, 3]], [p, p])[0].outputs[0].token_ids  # other work in batch
    c = llm.generate(PROMPT, SamplingParams(max_tokens=20, seed=99, ignore_eos=True))
    assert a == b
    assert a != c[0].outputs[0].token_ids


def test_n_choices_differ_and_are_seeded(llm):
    p = SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=5, ignore_eos=True)
    out = llm.generate(PROMPT, p)[0]
    ids = [o.token_ids for o in out.outputs]
    assert len(ids) == 3 and len({tuple(i) for i in ids}) == 3
    assert ids == [o.token_ids for o in llm.generate(PROMPT, p)[0].outputs]


def test_max_tokens_stop_token_ids_and_eos(llm):
    base = llm.generate(PROMPT, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    ids = base[0].outputs[0].token_ids
    assert len(ids) == 30 and base[0].outputs[0].finish_reason == "length"
    stop_tok = ids[10]
    first = ids.index(stop_tok)
    out = llm.generate(
        PROMPT, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(stop_tok,))
    )[0].outputs[0]
    assert out.token_ids == ids[: first + 1] and out.finish_reason == "stop"


def test_stop_string_truncates_text(llm):
    full = llm.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    text = full[0].outputs[0].text
    stop = text[12:15]
    assert stop and stop.strip()
    out = llm.generate(
        PROMPT, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=(stop,))
    )[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]


def test_logprobs_are_raw_model_logprobs(llm):
    out = llm.generate(
        PROMPT, SamplingParams(max_tokens=3, temperature=0, logprobs=2, ignore_eos=True)
    )[0].outputs[0]
    assert len(out.logprobs) == 3
    tok, lp, top = out.logprobs[0]
    assert tok == out.token_ids[0] and len(top) == 2
    assert top[0][0] == tok and abs(top[0][1] - lp) < 1e-6  # greedy: chosen = most likely
    assert lp <= 0


def test_penalties_change_greedy_output(llm):
    plain = llm.generate(PROMPT, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    rep = llm.generate(
        PROMPT,
        SamplingParams(
            max_tokens=30,
            temperature=0,
            ignore_eos=True,
            frequency_penalty=2.0,
            presence_penalty=2.0,
        ),
    )
    a, b = plain[0].outputs[0].token_ids, rep[0].outputs[0].token_ids
    assert a != b
    assert len(set(b)) >= len(set(a))


def test_top_k_top_p_min_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = probs_from_logits(logits, [SamplingParams(top_k=2)])
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0, 0]]))
    p = probs_from_logits(logits, [SamplingParams(top_p=0.8)])  # 0.5 + 0.3 reaches 0.8
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0, 0]]))
    p = probs_from_logits(logits, [SamplingParams(top_p=0.81)])
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)
    p = probs_from_logits(logits, [SamplingParams(min_p=0.5)])  # keep >= 0.25
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0, 0]]))
    p = probs_from_logits(logits, [SamplingParams(temperature=0)])
    assert p.tolist() == [[1.0, 0, 0, 0]]


def test_sampled_tokens_follow_the_distribution():
    from scipy.stats import chisquare

    from specserve.engine.sampler import sample

    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).repeat(8000, 1)
    draws = sample(probs, [None] * 8000)
    counts = torch.bincount(draws, minlength=4).tolist()
    assert chisquare(counts, [800, 1600, 2400, 3200]).pvalue > 1e-3


def test_seeded_rows_follow_the_distribution():
    """Seeded rows are drawn together by inverse CDF: the same law as unseeded rows, never a
    zero-probability token, each row reproducible from its seed whatever rows are beside it."""
    from scipy.stats import chisquare

    from specserve.engine.sampler import sample

    probs = torch.tensor([[0.1, 0.0, 0.2, 0.3, 0.4, 0.0]]).repeat(8000, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(8000)]
    mixed = [g if i % 2 else None for i, g in enumerate(gens)]  # seeded and global rows
    draws = sample(probs, mixed)
    counts = torch.bincount(draws[1::2], minlength=6).tolist()  # the 4,000 seeded rows
    assert counts[1] == counts[5] == 0
    nonzero = [counts[i] for i in (0, 2, 3, 4)]
    assert chisquare(nonzero, [400, 800, 1200, 1600]).pvalue > 1e-3
    again = sample(probs[1::2][:5], [torch.Generator().manual_seed(i) for i in (1, 3, 5, 7, 9)])
    assert again.tolist() == draws[1::2][:5].tolist()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_k=0),
        dict(max_tokens=0),
        dict(n=0),
        dict(min_p=2),
        dict(logprobs=50),
        dict(stop=("",)),
    ],
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(SamplingParamsError):
        SamplingParams(**kwargs)
