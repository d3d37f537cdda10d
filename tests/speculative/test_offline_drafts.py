"""Offline evaluation drafts exactly what the serving engine drafts (one drafting loop)."""

from __future__ import annotations

import pytest
import torch

from specserve.core import Request, SamplingParams
from specserve.models.loader import load_model
from specserve.speculative.base import Drafter, DraftProposal
from specserve.speculative.checkpoint import load_drafter
from specserve.speculative.handle import TargetHandle
from specserve.train.evaluate import drafts_and_alpha

from .conftest import PROMPTS, TakeTurns, make_llm


class Recorder(Drafter):
    """Passes a drafter's proposals through, keeping each request's context and draft."""

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.capture_layers = inner.capture_layers
        self.seen: list[tuple[list[int], list[int]]] = []

    @property
    def max_draft_tokens(self) -> int:
        return self.inner.max_draft_tokens

    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[DraftProposal]:
        proposals = self.inner.propose(requests, max_tokens)
        for req, p in zip(requests, proposals, strict=True):
            if p.tokens:
                self.seen.append((list(req.all_token_ids), list(p.tokens)))
        return proposals

    def update(self, requests: list[Request], hidden: list[torch.Tensor | None]) -> None:
        self.inner.update(requests, hidden)

    def release(self, request: Request) -> None:
        self.inner.release(request)


@pytest.mark.parametrize(
    "algorithm,kind", [("NEXTN", "mtp"), ("DFLASH", "dflash"), ("DSPARK", "dspark")]
)
@pytest.mark.parametrize("skipping", [False, True])
def test_offline_greedy_drafts_equal_the_engines(bundle, algorithm, kind, skipping):
    """skipping: requests draft only every third step, so the engine's drafter folds in several
    steps of context at once before drafting; its drafts must not change."""
    llm = make_llm(bundle, algorithm, "full")
    recorder = Recorder(llm.engine.drafter)
    llm.engine.set_speculation(recorder, TakeTurns(3) if skipping else llm.engine.planner)
    llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert len(recorder.seen) >= 3 * len(PROMPTS)

    target, _ = load_model(bundle["target"])
    drafter = load_drafter(bundle[kind], TargetHandle.of(target))
    k = recorder.max_draft_tokens
    gen = torch.Generator().manual_seed(0)
    for context, engine_draft in recorder.seen:
        anchor = len(context) - 1  # the last committed token; what follows it is not read
        seqs = torch.tensor([context + [0] * (k + 1)])
        drafts, _ = drafts_and_alpha(
            target, drafter, kind, seqs, 1, k, 0.0, gen, anchors=torch.tensor([[anchor]])
        )
        assert drafts.tokens[0, 0, : len(engine_draft)].tolist() == engine_draft, context
