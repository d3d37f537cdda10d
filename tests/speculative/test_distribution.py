"""Sampled outputs under speculation follow the target's distribution (two-sample chi-squared,
fixed seeds), and the same test does catch a verifier that is not lossless."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chi2_contingency

import specserve.engine.engine as engine_mod
from specserve.config import SpecConfig
from specserve.core import SamplingParams
from specserve.llm import LLM
from specserve.speculative.checkpoint import load_drafter, save_drafter
from specserve.speculative.factory import build_speculation
from specserve.speculative.gate import DraftGate

from .conftest import OracleDrafter, _bigram_boost, make_llm

N = 200
PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7]


def _samples(llm, seed0: int, **extra) -> list[tuple[int, int]]:
    params = [
        SamplingParams(max_tokens=3, temperature=1.0, seed=seed0 + i, **extra) for i in range(N)
    ]
    outs = llm.generate([PROMPT] * N, params)
    # tokens 2 and 3 come from verify passes (token 1 from the prefill)
    return [tuple(o.outputs[0].token_ids[1:3]) for o in outs]


def _p_value(a: list, b: list) -> float:
    ca, cb = Counter(a), Counter(b)
    keys = sorted(set(ca) | set(cb), key=lambda k: -(ca[k] + cb[k]))
    big = [k for k in keys if ca[k] + cb[k] >= 10]
    rows = [[ca[k] for k in big], [cb[k] for k in big]]
    rest = (len(a) - sum(rows[0]), len(b) - sum(rows[1]))
    if sum(rest):
        rows[0].append(rest[0])
        rows[1].append(rest[1])
    return float(chi2_contingency(rows).pvalue)


def _llm(bundle, peaked, algorithm="NONE", policy=None, **extra):
    return make_llm(bundle, algorithm, policy, target=peaked, max_running_requests=128, **extra)


@pytest.fixture(scope="module")
def peaked_dspark(bundle, peaked, tmp_path_factory):
    """The bundle's DSpark drafter with its Markov head fitted to the peaked target."""
    llm = LLM(str(peaked), max_running_requests=128)
    model = load_drafter(bundle["dspark"], llm.engine.target_handle())
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=50_000 + i) for i in range(100)]
    outs = llm.generate([PROMPT] * 100, params)
    _bigram_boost(model, [PROMPT[-1:] + o.outputs[0].token_ids for o in outs], scale=200.0)
    return save_drafter(model, tmp_path_factory.mktemp("peaked") / "dspark")


@pytest.fixture(scope="module")
def plain_samples(bundle, peaked):
    return _samples(_llm(bundle, peaked), seed0=0)


@pytest.mark.parametrize(
    "algorithm", ["DSPARK", "DSPARK-gated", "DSPARK-cpp", "oracle-flat", "oracle-argmax"]
)
def test_sampled_distribution_matches_plain(bundle, peaked, plain_samples, algorithm, request):
    if algorithm.startswith("oracle"):
        llm = _llm(bundle, peaked)
        oracle = OracleDrafter(llm.engine.model, 2, mode=algorithm.split("-")[1])
        llm.engine.set_speculation(oracle, llm.engine.planner)
    else:  # -cpp: the draft layers in C++ (`FusedDraft.hidden`), the picks in PyTorch
        backend = "cpp" if algorithm.endswith("cpp") else "torch"
        llm = _llm(bundle, peaked, attention_backend=backend)
        spec = SpecConfig(
            "DSPARK",
            str(request.getfixturevalue("peaked_dspark")),
            verify_policy="full",
            adaptive_drafting=False,  # the plain arm drafts every step; the gated one wraps it
        )
        drafter, planner = build_speculation(spec, llm.engine)
        assert (getattr(drafter, "fused", None) is not None) == (backend == "cpp")
        if algorithm.endswith("gated"):  # decisions to draft from past acceptance and times
            planner = DraftGate(planner, probe_every=2, head_confidences=True)
        llm.engine.set_speculation(drafter, planner)
    spec = _samples(llm, seed0=100_000)
    stats = llm.engine.stats
    assert stats.num_accepted_tokens > 0  # both accepted and rejected drafts were exercised
    assert stats.num_accepted_tokens < stats.num_draft_tokens
    p_value = _p_value(plain_samples, spec)
    assert p_value > 1e-3


def test_chi2_detects_a_lossy_verifier(bundle, peaked, plain_samples, monkeypatch):
    """Negative control: accepting every draft token (no rejection) must be detected."""

    def accept_all(draft_tokens, draft_lens, q, p, generators):
        num = draft_lens + 1
        out = torch.full((draft_tokens.shape[0], draft_tokens.shape[1] + 1), -1)
        for r in range(draft_tokens.shape[0]):
            n = int(draft_lens[r])
            out[r, :n] = draft_tokens[r, :n]
            out[r, n] = int(torch.multinomial(p[r, n], 1, generator=generators[r]))
        return out, num

    monkeypatch.setattr(engine_mod, "rejection_verify", accept_all)
    llm = _llm(bundle, peaked)
    llm.engine.set_speculation(OracleDrafter(llm.engine.model, 2, "flat"), llm.engine.planner)
    p_value = _p_value(plain_samples, _samples(llm, seed0=100_000))
    assert p_value < 1e-3
