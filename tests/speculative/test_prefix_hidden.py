"""Prefix caching with drafters that read the target's hidden states (NEXTN, DFLASH, DSPARK): a
prefix hit hands the drafter the cached tokens' hidden rows from the pool kept beside the K/V,
so it drafts exactly as with prefix caching off, and greedy output equals plain decoding."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from specserve.config import SpecConfig
from specserve.core import Request, SamplingParams
from specserve.engine.model_runner import kv_bytes_per_token
from specserve.llm import LLM
from specserve.speculative.base import Drafter, DraftProposal
from specserve.speculative.checkpoint import new_drafter, save_drafter
from specserve.speculative.factory import build_speculation

from .conftest import ALGORITHMS, BLOCK, PROMPTS, _bigram_boost, assert_kv_baseline

HIDDEN_STATE = ["NEXTN", "DFLASH", "DSPARK"]
PAGE = 8
MAX_TOKENS = 24
# a long shared prefix (7 full pages), then each request's own tail
PREFIX = [t for p in PROMPTS[:3] for t in p] + list(range(30, 45))
FIRST, SECOND, OTHER = PREFIX + [300, 301], PREFIX + [7, 7, 7], list(range(400, 470))


@pytest.fixture(scope="module")
def bundle(bundle, tmp_path_factory):
    """The session bundle with a DSpark drafter boosted on these prompts' greedy outputs, so
    its drafts are often accepted here and acceptance comparisons are not vacuous."""
    plain, _ = _llm(bundle, "NONE", enable_prefix_caching=False)
    done = _run(plain, [("a", FIRST), ("b", SECOND), ("other", OTHER)])
    raw = json.loads((bundle["target"] / "config.json").read_text())
    dspark = new_drafter(
        raw,
        "dspark",
        target_layer_ids=[0, 1],
        markov_rank=raw["vocab_size"],
        markov_head_type="vanilla",
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        block_size=BLOCK,
        mask_token_id=3,
    )
    _bigram_boost(dspark, [r.all_token_ids for r in done.values()])
    folder = tmp_path_factory.mktemp("prefix") / "dspark"
    save_drafter(dspark, folder)
    return {**bundle, "dspark": folder}


@dataclass
class Seen:
    """What the drafter saw and proposed for one request, in order."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    drafts: list[list[int]] = field(default_factory=list)


class Recorder(Drafter):
    """Wraps an engine drafter and records, per request id, the hidden rows `update` receives
    and the draft tokens `propose` returns."""

    def __init__(self, inner: Drafter) -> None:
        self.inner, self.capture_layers = inner, inner.capture_layers
        self.seen: dict[str, Seen] = {}

    @property
    def max_draft_tokens(self) -> int:
        return self.inner.max_draft_tokens

    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[DraftProposal]:
        out = self.inner.propose(requests, max_tokens)
        for r, p in zip(requests, out, strict=True):
            self.seen.setdefault(r.request_id, Seen()).drafts.append(p.tokens)
        return out

    def update(self, requests: list[Request], hidden: list[torch.Tensor | None]) -> None:
        for r, h in zip(requests, hidden, strict=True):
            if h is not None:
                self.seen.setdefault(r.request_id, Seen()).hidden.append(h.clone())
        self.inner.update(requests, hidden)

    def release(self, request: Request) -> None:
        self.inner.release(request)

    def num_tracked_requests(self) -> int:
        return self.inner.num_tracked_requests()


def _llm(bundle, algorithm: str, **cache) -> tuple[LLM, Recorder | None]:
    cache.setdefault("max_total_tokens", 4096)
    llm = LLM(str(bundle["target"]), page_size=PAGE, **cache)
    if algorithm == "NONE":
        return llm, None
    folder = ALGORITHMS[algorithm]
    spec = SpecConfig(
        algorithm=algorithm,
        draft_model_path=str(bundle[folder]),
        verify_policy="full",
        adaptive_drafting=False,  # drafts on every step: runs compare draft for draft
    )
    drafter, planner = build_speculation(spec, llm.engine)
    recorder = Recorder(drafter)
    llm.engine.set_speculation(recorder, planner)
    return llm, recorder


def _run(llm: LLM, requests: list[tuple[str, list[int]]], max_tokens: int = MAX_TOKENS) -> dict:
    """Run the requests one after another (each starts once the one before has finished)."""
    eng, done = llm.engine, {}
    for rid, prompt in requests:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        done[rid] = eng.add_request(prompt, params, request_id=rid)
        while eng.has_unfinished():
            eng.step()
    assert_kv_baseline(llm)
    return done


def _same_view(cached: Seen, fresh: Seen) -> None:
    """The drafter saw the same hidden rows (all positions, once each) and drafted the same."""
    a, b = torch.cat(cached.hidden), torch.cat(fresh.hidden)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert cached.drafts == fresh.drafts


@pytest.mark.parametrize("algorithm", HIDDEN_STATE)
def test_prefix_hit_drafts_as_without_cache(bundle, algorithm):
    plain, _ = _llm(bundle, "NONE", enable_prefix_caching=False)
    want = _run(plain, [("b", SECOND)])["b"].output_token_ids
    llm, seen = _llm(bundle, algorithm)
    assert llm.engine.block_manager.enable_prefix_caching
    got = _run(llm, [("a", FIRST), ("b", SECOND)])
    off, seen_off = _llm(bundle, algorithm, enable_prefix_caching=False)
    ref = _run(off, [("a", FIRST), ("b", SECOND)])
    b, b_off = got["b"], ref["b"]
    assert b.num_cached_tokens == len(PREFIX) // PAGE * PAGE
    assert llm.engine.block_manager.prefix_hit_tokens == b.num_cached_tokens
    assert b.output_token_ids == want
    # the first hidden rows the drafter got for "b" cover the cached prefix too
    assert seen.seen["b"].hidden[0].shape[0] == len(SECOND)
    _same_view(seen.seen["b"], seen_off.seen["b"])
    assert b.spec_draft_token_num == b_off.spec_draft_token_num > 0
    assert b.spec_accept_token_num == b_off.spec_accept_token_num
    if algorithm == "DSPARK":  # boosted on these prompts: the acceptance is not vacuous
        assert b.spec_accept_token_num > 0


@pytest.mark.parametrize("algorithm", ["DSPARK", "NEXTN"])
def test_evicted_pages_hand_no_stale_rows(bundle, algorithm):
    """A small cache: a long unrelated request reuses some of the first request's freed pages
    (new K/V and hidden rows there); the next request with the shared prefix hits only the pages
    that survived, and the drafter still sees exactly the rows it sees without prefix caching."""
    blocks = 16  # FIRST + 24 tokens: 11 pages; OTHER + 24 tokens: 12 pages
    order = [("a", FIRST), ("other", OTHER), ("b", SECOND)]
    llm, seen = _llm(bundle, algorithm, max_total_tokens=blocks * PAGE)
    got = _run(llm, order)
    off, seen_off = _llm(
        bundle, algorithm, max_total_tokens=blocks * PAGE, enable_prefix_caching=False
    )
    ref = _run(off, order)
    plain, _ = _llm(bundle, "NONE", enable_prefix_caching=False)
    want = _run(plain, [("b", SECOND)])["b"].output_token_ids
    b = got["b"]
    assert 0 < b.num_cached_tokens < len(PREFIX) // PAGE * PAGE  # some prefix pages evicted
    assert b.output_token_ids == want
    _same_view(seen.seen["b"], seen_off.seen["b"])
    assert b.spec_accept_token_num == ref["b"].spec_accept_token_num
    # again: the pages "b" recomputed are cached now, with their new rows
    more = _run(llm, [("c", SECOND)])["c"]
    assert more.num_cached_tokens == len(PREFIX) // PAGE * PAGE
    assert more.output_token_ids == want
    _same_view(seen.seen["c"], seen_off.seen["b"])


def test_hidden_pool_counts_in_the_cache_budget(bundle):
    """Sized from memory, the K/V and the hidden pool share the bytes the K/V alone had; an
    explicit --max-total-tokens keeps its token count. Drafters without hidden states need no
    pool, and switching back to one restores every block."""
    llm, _ = _llm(bundle, "NONE", max_total_tokens=None, mem_fraction_static=0.001)
    eng = llm.engine
    before = eng.block_manager.num_blocks
    assert eng.runner.hidden_pool is None
    drafter, planner = build_speculation(
        SpecConfig(algorithm="DSPARK", draft_model_path=str(bundle["dspark"])), eng
    )
    eng.set_speculation(drafter, planner)
    cfg = eng.model_config
    kv = kv_bytes_per_token(cfg, torch.float32)
    hidden = len(drafter.capture_layers) * cfg.hidden_size * 4
    assert eng.block_manager.num_blocks == before * kv // (kv + hidden) < before
    assert eng.runner.hidden_pool.shape == (eng.block_manager.num_blocks, PAGE, hidden // 4)
    assert eng.runner.kv_cache[0].shape[2] == eng.block_manager.num_blocks
    ngram, planner = build_speculation(SpecConfig(algorithm="NGRAM"), eng)
    eng.set_speculation(ngram, planner)
    assert eng.block_manager.num_blocks == before and eng.runner.hidden_pool is None
    fixed, _ = _llm(bundle, "DSPARK", max_total_tokens=64 * PAGE)
    assert fixed.engine.block_manager.num_blocks == 64
    assert fixed.engine.runner.hidden_pool.shape[0] == 64


def test_prefix_caching_off_keeps_no_pool(bundle):
    llm, _ = _llm(bundle, "DSPARK", enable_prefix_caching=False)
    assert llm.engine.runner.hidden_pool is None
    assert _run(llm, [("a", FIRST), ("b", SECOND)])["b"].num_cached_tokens == 0
