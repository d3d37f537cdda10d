"""Tiny targets and drafters for the speculative-decoding tests, built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specserve.config import SpecConfig
from specserve.core import Request, SamplingParams
from specserve.engine.sampler import probs_from_logits
from specserve.llm import LLM
from specserve.models.attention import CausalAttention
from specserve.speculative.base import Drafter, DraftProposal
from specserve.speculative.checkpoint import new_drafter, save_drafter
from specserve.speculative.factory import build_speculation
from specserve.speculative.planner import Planner
from specserve.speculative.profile import SPSTable
from specserve.testing.tiny import make_checkpoint

BLOCK = 4
TARGET = {"init_std": 0.2}  # peaked distributions: repetitive greedy text, low-entropy sampling


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> dict[str, Path]:
    """A tiny target and one drafter folder per algorithm (random weights)."""
    root = tmp_path_factory.mktemp("spec")
    target = make_checkpoint(root / "target", seed=0, **TARGET)
    raw = json.loads((target / "config.json").read_text())
    common = dict(block_size=BLOCK, mask_token_id=3)
    save_drafter(new_drafter(raw, "mtp"), root / "mtp")
    save_drafter(new_drafter(raw, "dflash", target_layer_ids=[-1, 1], **common), root / "dflash")
    dspark = new_drafter(
        raw,
        "dspark",
        target_layer_ids=[0, 1],
        markov_rank=raw["vocab_size"],
        markov_head_type="vanilla",
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        **common,
    )
    greedy = LLM(str(target)).generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0))
    _bigram_boost(
        dspark, [p + o.outputs[0].token_ids for p, o in zip(PROMPTS, greedy, strict=True)]
    )
    save_drafter(dspark, root / "dspark")
    SPSTable((1, 8, 32, 128), (100.0, 95.0, 80.0, 30.0)).save(root / "sps.json")
    return {
        "root": root,
        "target": target,
        "mtp": root / "mtp",
        "dflash": root / "dflash",
        "dspark": root / "dspark",
        "sps": root / "sps.json",
    }


@pytest.fixture(scope="session")
def peaked(tmp_path_factory):
    """A target whose temperature-1 distributions are peaked enough for a chi-squared test."""
    return make_checkpoint(tmp_path_factory.mktemp("peaked") / "t", seed=0, init_std=1.0)


def _bigram_boost(model, sequences: list[list[int]], scale: float = 8.0) -> None:
    """Make the Markov head propose the most frequent successor of each token in `sequences`
    (the target's own outputs), so the DSpark drafter is accepted often and tests cover both
    accepted and rejected drafts."""
    vocab = model.config.model.vocab_size
    counts = torch.zeros(vocab, vocab)
    for seq in sequences:
        for a, b in zip(seq, seq[1:], strict=False):
            counts[a, b] += 1
    with torch.no_grad():
        model.markov_head.markov_w1.weight.copy_(torch.eye(vocab))
        best = (counts > 0) & (counts == counts.max(1, keepdim=True).values)  # [prev, next]
        model.markov_head.markov_w2.weight.copy_(scale * best.t())  # bias[next] = W2[next, prev]
        model.confidence_head.proj.weight.zero_()
        model.confidence_head.proj.bias.fill_(2.0)


PROMPTS = [
    [5, 6, 7, 8, 9, 10, 5, 6, 7],
    [20, 21, 22],
    list(range(30, 60)),
    [100],
    [7, 7, 7, 7, 7, 7, 7, 7],
    list(range(200, 217)),
]

ALGORITHMS = {"NGRAM": None, "NEXTN": "mtp", "DFLASH": "dflash", "DSPARK": "dspark"}
POLICIES = ("full", "threshold", "scheduler")


def make_llm(
    bundle, algorithm: str = "NONE", policy: str | None = None, gate: bool = False, **kwargs
) -> LLM:
    """gate: the default draft gate on (off here, so that a test's verify policy sees every
    draft; the gated tests turn it on)."""
    kwargs.setdefault("max_total_tokens", 4096)
    llm = LLM(str(kwargs.pop("target", bundle["target"])), **kwargs)
    folder = ALGORITHMS.get(algorithm)
    spec = SpecConfig(
        algorithm=algorithm,
        draft_model_path=str(bundle[folder]) if folder else None,
        verify_policy=policy,
        sps_table_path=str(bundle["sps"]),
        confidence_threshold=0.3,
        adaptive_drafting=gate,
    )
    llm.engine.set_speculation(*build_speculation(spec, llm.engine))
    return llm


def assert_kv_baseline(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.has_unfinished()


class OracleDrafter(Drafter):
    """Drafts with the target itself (a full no-cache forward per draft token).

    mode "exact": greedy tokens at temperature 0, else samples from exactly the distribution the
    target verifies against (so every draft should be accepted); "flat": samples from the target
    at twice the temperature (q != p: exercises rejections); "argmax": proposes the target's
    argmax without probabilities (a deterministic, one-hot proposal, like n-gram)."""

    def __init__(self, model, k: int, mode: str = "exact") -> None:
        self.model, self.k, self.mode = model, k, mode

    @property
    def max_draft_tokens(self) -> int:
        return self.k

    @torch.inference_mode()
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[DraftProposal]:
        seqs = [list(r.all_token_ids) for r in requests]
        toks: list[list[int]] = [[] for _ in requests]
        qs: list[list[torch.Tensor]] = [[] for _ in requests]
        for step in range(self.k):
            todo = [i for i, m in enumerate(max_tokens) if step < m]
            by_len: dict[int, list[int]] = {}
            for i in todo:
                by_len.setdefault(len(seqs[i]), []).append(i)
            for t, group in by_len.items():  # one no-cache forward per sequence length
                ids = torch.tensor([seqs[i] for i in group]).reshape(-1)
                pos = torch.arange(t).repeat(len(group))
                h = self.model(ids, pos, CausalAttention(len(group), t)).hidden
                logits = self.model.compute_logits(h.view(len(group), t, -1)[:, -1])
                if self.mode == "flat":
                    logits = logits / 2.0
                for row, i in enumerate(group):
                    req = requests[i]
                    q = probs_from_logits(logits[row : row + 1], [req.params])[0]
                    if req.params.greedy or self.mode == "argmax":
                        tok = int(logits[row].argmax())
                    else:
                        tok = int(torch.multinomial(q, 1, generator=req.generator))
                    toks[i].append(tok)
                    qs[i].append(q)
                    seqs[i].append(tok)
        out = []
        for i, req in enumerate(requests):
            deterministic = req.params.greedy or self.mode == "argmax"
            probs = torch.stack(qs[i]) if qs[i] and not deterministic else None
            out.append(DraftProposal(toks[i], probs))
        return out


class TakeTurns(Planner):
    """Lets each request draft only on every `every`-th of its steps (offset by its arrival), so
    steps mix drafting and non-drafting requests and a request's drafter context falls several
    steps behind before it drafts again. Reads only step counts, so it stays lossless.
    `mixed`: steps that had both kinds."""

    def __init__(self, every: int = 3) -> None:
        self.every, self.mixed = every, 0
        self.steps: dict[str, int] = {}

    def allow(
        self, requests: list[Request], num_decoding: int | None = None, context_tokens: int = 0
    ) -> list[bool]:
        out = []
        for r in requests:
            n = self.steps.setdefault(r.request_id, len(self.steps)) + 1
            self.steps[r.request_id] = n
            out.append(n % self.every == 0)
        self.mixed += any(out) and not all(out)
        return out
