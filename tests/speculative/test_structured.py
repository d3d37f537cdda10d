"""Structured output under speculative decoding: greedy with a grammar is token-identical to
greedy with the same grammar and no speculation; sampled output follows the masked target
distribution (chi-squared)."""

from __future__ import annotations

import json

import pytest
import torch

from specserve.core import SamplingParams
from specserve.structured.grammar import GrammarSpec

from .conftest import PROMPTS, OracleDrafter, assert_kv_baseline, make_llm
from .test_distribution import _llm, _p_value, _samples

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "size": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "size", "ok"],
    "additionalProperties": False,
}
GRAMMARS = {
    "json_schema": GrammarSpec("json_schema", json.dumps(SCHEMA)),
    "regex": GrammarSpec("regex", "(ab|[a-z ]{1,3}|[0-9]+)+\\."),
}


def _params(grammar, **kw):
    return SamplingParams(max_tokens=64, temperature=0, grammar=grammar, **kw)


@pytest.mark.parametrize("kind", list(GRAMMARS))
@pytest.mark.parametrize("algorithm", ["NGRAM", "DSPARK", "oracle"])
def test_greedy_with_grammar_identical_to_plain(bundle, algorithm, kind):
    params = _params(GRAMMARS[kind])
    want = make_llm(bundle).generate(PROMPTS, params)
    if algorithm == "oracle":  # drafts from the unmasked target: many forbidden drafts
        llm = make_llm(bundle)
        llm.engine.set_speculation(OracleDrafter(llm.engine.model, 4), llm.engine.planner)
    else:
        llm = make_llm(bundle, algorithm, "full")
    got = llm.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert llm.engine.stats.num_draft_tokens > 0
    assert_kv_baseline(llm)
    if kind == "json_schema":
        for o in got:
            if o.outputs[0].finish_reason == "stop":
                value = json.loads(o.outputs[0].text)
                assert set(value) == {"name", "size", "ok"} and len(value["name"]) <= 6


def test_bad_grammars_are_request_errors(bundle):
    from specserve.engine.engine import RequestError

    llm = make_llm(bundle)
    for spec, needle in (
        (GrammarSpec("json_schema", '{"type": "objectx"}'), "objectx"),
        (GrammarSpec("regex", "a(("), "regex"),
        (GrammarSpec("choice", "[]"), "choice"),
    ):
        with pytest.raises(RequestError, match=needle):
            llm.engine.add_request([1, 2], _params(spec))
    with pytest.raises(RequestError, match="ignore_eos"):
        llm.engine.add_request([1, 2], _params(GRAMMARS["regex"], ignore_eos=True))


CHOICE = GrammarSpec("regex", "[a-z]+( [a-z]+)*")  # forbids the peaked target's favourite tokens


def test_sampled_with_grammar_follows_the_masked_target(bundle, peaked):
    plain = _samples(_llm(bundle, peaked), seed0=300_000, grammar=CHOICE)
    llm = _llm(bundle, peaked)
    llm.engine.set_speculation(OracleDrafter(llm.engine.model, 2, "flat"), llm.engine.planner)
    spec = _samples(llm, seed0=400_000, grammar=CHOICE)
    stats = llm.engine.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert _p_value(plain, spec) > 1e-3


def test_masks_along_rolls_back(bundle):
    llm = make_llm(bundle)
    matcher = llm.engine.grammar.matcher(GRAMMARS["regex"])
    tok = llm.engine.tokenizer
    before = matcher.mask()
    draft = tok.encode("ab12.")
    allowed, keep = matcher.masks_along(draft)
    assert keep == len(draft) and allowed.shape == (keep + 1, before.shape[0])
    assert torch.equal(matcher.mask(), before)
    assert all(allowed[i, t] for i, t in enumerate(draft))
    ok, bad = tok.encode("ab"), tok.encode("#")
    allowed, cut = matcher.masks_along(ok + bad + ok)
    assert cut == len(ok) + 1  # the forbidden token stays, so the verifier rejects it
    assert not allowed[len(ok), bad[0]]
