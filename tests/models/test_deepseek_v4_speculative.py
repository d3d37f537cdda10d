"""Speculative decoding on DeepSeek-V4: its own MTP layer as NEXTN, n-gram, and a target oracle
that drafts mostly right (so verify windows are accepted in part and rolled back mid-window)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import chi2_contingency

from specserve.config import ConfigError, SpecConfig
from specserve.core import Request, SamplingParams
from specserve.llm import LLM
from specserve.models.deepseek_v4 import V4Context
from specserve.speculative.base import Drafter, DraftProposal
from specserve.speculative.deepseek_v4_mtp import DeepseekV4MTPDrafter
from specserve.speculative.factory import build_speculation
from specserve.speculative.planner import Planner
from specserve.testing.tiny import make_deepseek_v4_checkpoint

PROMPTS = [[5, 6, 7, 8, 9], list(range(40, 63)), list(range(100, 138))]


class OracleDrafter(Drafter):
    """Drafts with the target itself (full no-cache forwards). Greedy requests get its argmax
    with every third position corrupted, so some windows are rejected part-way; sampled ones
    get a sample from the target at twice the temperature, with that q reported exactly."""

    def __init__(self, model, k: int) -> None:
        self.model, self.k, self.calls = model, k, 0

    @property
    def max_draft_tokens(self) -> int:
        return self.k

    @torch.inference_mode()
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[DraftProposal]:
        """Draft position j for every request at once: one ragged no-cache forward over all the
        sequences, laid out in turn."""
        ks = [min(self.k, m) for m in max_tokens]
        seqs = [list(r.all_token_ids) for r in requests]
        toks: list[list[int]] = [[] for _ in requests]
        qs: list[list[torch.Tensor]] = [[] for _ in requests]
        for j in range(max(ks, default=0)):
            live = [i for i, k in enumerate(ks) if j < k]
            lengths = [len(seqs[i]) for i in live]
            ctx = V4Context.fresh(self.model, lengths)
            flat = torch.tensor([t for i in live for t in seqs[i]])
            out = self.model(flat, torch.cat([torch.arange(n) for n in lengths]), ctx)
            last = torch.tensor(lengths).cumsum(0) - 1
            logits = self.model.compute_logits(out.hidden[last])
            for row, i in enumerate(live):
                req = requests[i]
                self.calls += 1
                if req.params.greedy:
                    tok = int(logits[row].argmax())
                    tok = (tok + 1) % 512 if (self.calls + j) % 3 == 0 else tok
                else:
                    q = torch.softmax(logits[row] / (2.0 * req.params.temperature), dim=-1)
                    tok = int(torch.multinomial(q, 1, generator=req.generator))
                    qs[i].append(q)
                toks[i].append(tok)
                seqs[i].append(tok)
        return [
            DraftProposal(t, torch.stack(q) if q else None) for t, q in zip(toks, qs, strict=True)
        ]


def _llm(path: str, algorithm: str = "NONE", oracle_k: int = 4, **kw) -> LLM:
    kw.setdefault("chunked_prefill_size", 16)
    llm = LLM(path, max_total_tokens=kw.pop("max_total_tokens", 2048), page_size=8, **kw)
    if algorithm == "ORACLE":
        oracle = OracleDrafter(llm.engine.model, oracle_k)
        llm.engine.set_speculation(oracle, Planner())  # full verify windows
    elif algorithm != "NONE":
        spec = SpecConfig(
            algorithm=algorithm,
            draft_model_path=path if algorithm == "NEXTN" else None,
            num_steps=3,
            adaptive_drafting=False,
        )
        llm.engine.set_speculation(*build_speculation(spec, llm.engine))
    return llm


@pytest.fixture(scope="module")
def greedy_plain(tiny_v4_path):
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    return [o.outputs[0].token_ids for o in _llm(tiny_v4_path).generate(PROMPTS, params)]


@pytest.mark.parametrize("algorithm", ["NEXTN", "NGRAM", "ORACLE"])
def test_greedy_identical_to_plain(tiny_v4_path, greedy_plain, algorithm):
    llm = _llm(tiny_v4_path, algorithm)
    if algorithm == "NEXTN":
        assert isinstance(llm.engine.drafter, DeepseekV4MTPDrafter)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert got == greedy_plain
    stats = llm.engine.stats
    assert stats.num_draft_tokens > 0
    if algorithm == "ORACLE":  # partly accepted windows: rollbacks inside accepted blocks
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.fixture(scope="module")
def peaked(tiny_v4_path, tmp_path_factory):
    """The fixture with its LM head scaled up, so temperature-1 outputs are peaked enough for a
    chi-squared test (the MTP layer reads the same head)."""
    out = Path(tmp_path_factory.mktemp("peaked")) / "dsv4"
    make_deepseek_v4_checkpoint(out, seed=0)
    state = load_file(str(out / "model.safetensors"))
    state["head.weight"] = state["head.weight"] * 40
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def _samples(path: str, algorithm: str, n: int = 200) -> tuple[list, LLM]:
    # all n in one batch, their prompts in one prefill chunk: a handful of steps
    llm = _llm(
        path,
        algorithm,
        oracle_k=2,
        max_running_requests=n,
        chunked_prefill_size=8 * n,
        max_total_tokens=16 * n,
    )
    # room for a whole window (3 MTP steps) after the prefill's token: no drafts past the end
    params = [SamplingParams(max_tokens=5, temperature=1.0, seed=10_000 + i) for i in range(n)]
    outs = llm.generate([PROMPTS[0]] * n, params)
    return [tuple(o.outputs[0].token_ids[1:3]) for o in outs], llm  # first verify pass


def _p_value(a: list, b: list) -> float:
    ca, cb = Counter(a), Counter(b)
    keys = sorted(set(ca) | set(cb), key=lambda k: -(ca[k] + cb[k]))
    big = [k for k in keys if ca[k] + cb[k] >= 10]
    rows = [[ca[k] for k in big], [cb[k] for k in big]]
    rest = (len(a) - sum(rows[0]), len(b) - sum(rows[1]))
    if sum(rest):
        rows[0].append(rest[0])
        rows[1].append(rest[1])
    assert len(rows[0]) >= 3, "outputs too spread for a chi-squared test"
    return float(chi2_contingency(rows).pvalue)


@pytest.fixture(scope="module")
def plain_samples(peaked):
    return _samples(peaked, "NONE")[0]


@pytest.mark.parametrize("algorithm", ["NEXTN", "ORACLE"])
def test_sampling_follows_the_target(peaked, plain_samples, algorithm):
    """Two-sample chi-squared against plain sampling. The random MTP layer is mostly rejected
    (the resampling path); the oracle's drafts are mostly accepted, so sampled verify windows
    are kept in part and the state rolled back mid-window."""
    spec, llm = _samples(peaked, algorithm)
    stats = llm.engine.stats
    assert stats.num_draft_tokens > 0  # NEXTN's random layer: its drafts all but never accepted
    if algorithm == "ORACLE":
        assert stats.num_accepted_tokens > stats.num_draft_tokens / 4
    assert _p_value(plain_samples, spec) > 0.01


def test_nextn_without_mtp_weights_is_a_clear_error(tmp_path):
    path = make_deepseek_v4_checkpoint(tmp_path / "no_mtp", seed=1, mtp=False)
    with pytest.raises(ConfigError, match="MTP layer lacks mtp.0."):
        _llm(str(path), "NEXTN")


def test_dflash_on_deepseek_v4_is_a_clear_error(tiny_v4_path):
    with pytest.raises(ConfigError, match="DFLASH is not supported for DeepSeek-V4"):
        llm = LLM(tiny_v4_path, max_total_tokens=256, page_size=8)
        spec = SpecConfig(algorithm="DFLASH", draft_model_path=tiny_v4_path)
        build_speculation(spec, llm.engine)
