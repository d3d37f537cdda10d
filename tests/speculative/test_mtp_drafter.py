"""The engine's MTP drafter (`MTPDrafter`: K/V rows kept in place, `RowAttention` for the
catch-up and every chain step) against a from-scratch reference: the layer run causally over
the committed rows (`RecordingCausal`), then `MTPModule.draft` chained over them
(`BranchAttention`, the offline evaluation's contexts). Tokens and draft probabilities, greedy
and sampled requests in one batch, ragged contexts, a prefix-cache hit, a rejected draft and a
replay after preemption, on the C++ kernel and the PyTorch path."""

from __future__ import annotations

import pytest
import torch

from specserve import kernels
from specserve.config import ModelConfig
from specserve.core import Request, SamplingParams
from specserve.models.qwen3 import tile_products
from specserve.speculative.mtp import MTPDrafter, MTPModule
from specserve.testing.tiny import tiny_config
from specserve.train.evaluate import BranchAttention, RecordingCausal

K = 4  # chain steps
V = 64


def _module(head_dim: int) -> MTPModule:
    cfg = tiny_config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        head_dim=head_dim,
    )
    torch.manual_seed(0)
    return MTPModule(ModelConfig.from_dict(cfg)).eval()


@pytest.fixture(params=["torch", "cpp", "fused"])
def path(request) -> str:
    """torch: the PyTorch path; cpp: the chain in PyTorch, attention through `row_attention`;
    fused: every product tiled, so greedy batches chain in one `mtp_chain` call."""
    if request.param != "torch":
        kernels.load()
    return request.param


def _drafter(mtp: MTPModule, path: str) -> MTPDrafter:
    if path == "fused":
        tile_products(mtp)
    drafter = MTPDrafter(mtp, K)
    assert (drafter.fused is not None) == (path == "fused")
    drafter.kernel = path != "torch"
    return drafter


@pytest.fixture(params=[8, 64], ids=["d8", "d64"])
def mtp(request) -> MTPModule:
    return _module(request.param)


class Stream:
    """One request's token sequence and target hidden rows, fed to the drafter as the engine
    would: `commit(n)` makes the first n tokens known and the rows of the first n - 1 computed."""

    def __init__(self, rid: str, length: int, seed: int, temperature: float = 0.0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, V, (length,), generator=gen).tolist()
        self.hidden = torch.randn(length, 32, generator=gen)
        params = SamplingParams(max_tokens=length, temperature=temperature, seed=seed)
        self.req = Request(self.tokens[:1], params, length, request_id=rid)

    def commit(self, n: int, first_row: int, drafter: MTPDrafter) -> None:
        """Tokens 0..n-1 known; rows first_row .. n - 2 computed now."""
        self.req.output_token_ids = self.tokens[1:n]
        self.req.num_computed_tokens = n - 1
        drafter.update([self.req], [self.hidden[first_row : n - 1]])


def _reference(mtp: MTPModule, s: Stream, first: int, n: int, forced: torch.Tensor | None):
    """Draft after the first n tokens of `s` from the rows at positions first .. n - 2: tokens
    [K] (argmax, or `forced`) and the draft distributions [K, V] at temperature 1."""
    ids, hid = torch.tensor(s.tokens[:n]), s.hidden[:n]
    m = n - 1 - first
    rec = RecordingCausal(1, m)
    x = mtp.combine(ids[first + 1 : n], hid[first : n - 1])
    rows = mtp.layer(x, torch.arange(first, n - 1), rec)
    step = iter(range(K))

    def pick(logits):
        probs = torch.softmax(logits.float(), -1)
        return (logits.argmax(-1) if forced is None else forced[next(step)].view(1, 1)), probs

    branch = BranchAttention(rec, torch.tensor([[m]]))
    tokens, probs = mtp.draft(rows[-1].view(1, 1, -1), torch.tensor([[n - 1]]), branch, K, pick)
    return tokens[0, 0], probs[0, 0]


def _check(drafter, mtp, streams, firsts, ns):
    """One propose for all `streams` against the reference of each."""
    proposals = drafter.propose([s.req for s in streams], [K] * len(streams))
    for s, first, n, p in zip(streams, firsts, ns, proposals, strict=True):
        got = torch.tensor(p.tokens)
        if s.req.params.greedy:
            tokens, probs = _reference(mtp, s, first, n, None)
            assert got.tolist() == tokens.tolist()
            torch.testing.assert_close(p.confidences, probs.max(-1).values, atol=1e-5, rtol=1e-5)
        else:  # the sampled tokens, and q of each step given the tokens before it
            _, probs = _reference(mtp, s, first, n, got)
            torch.testing.assert_close(p.probs, probs, atol=1e-5, rtol=1e-5)
    return proposals


@torch.inference_mode()
def test_ragged_batch_greedy_and_sampled(mtp, path):
    drafter = _drafter(mtp, path)
    streams = [Stream("a", 300, 1), Stream("b", 40, 2, 1.0), Stream("c", 90, 3), Stream("d", 30, 4)]
    ns = [200, 12, 70, 3]  # ragged contexts, some past a tile of 64 keys
    for s, n in zip(streams, ns, strict=True):
        s.commit(n, 0, drafter)
    _check(drafter, mtp, streams, [0] * 4, ns)
    for grow in (1, 3, 2):  # accepted drafts: the contexts grow, each by its own count
        for i, s in enumerate(streams):
            ns[i] += grow + i % 2
            s.commit(ns[i], ns[i] - 1 - grow - i % 2, drafter)
        _check(drafter, mtp, streams, [0] * 4, ns)
    assert drafter.states["a"].rows.length == ns[0] - 1  # committed rows only


@torch.inference_mode()
def test_prefix_cache_hit_rejected_draft_and_replay(mtp, path):
    drafter = _drafter(mtp, path)
    hit, plain = Stream("hit", 200, 5), Stream("plain", 200, 6, 1.0)
    hit.commit(100, 48, drafter)  # rows 0..47 came from the prefix cache: the module never saw them
    plain.commit(60, 0, drafter)
    _check(drafter, mtp, [hit, plain], [48, 0], [100, 60])
    # a rejected draft: one token commits (a bonus), not the chain's; its rows must not stay
    hit.tokens[100] = (hit.tokens[100] + 1) % V
    hit.commit(101, 99, drafter)
    plain.commit(61, 59, drafter)
    _check(drafter, mtp, [hit, plain], [48, 0], [101, 61])
    # a replay after preemption: rows from position 80 (hit) and 20 (plain) computed again
    hit.hidden[80:] += 0.5
    plain.hidden[20:] -= 0.5
    hit.commit(103, 80, drafter)
    plain.commit(61, 20, drafter)
    _check(drafter, mtp, [hit, plain], [48, 0], [103, 61])
    # a replay from before the first cached row: the request starts over from there
    hit.hidden[30:] += 0.25
    hit.commit(104, 30, drafter)
    _check(drafter, mtp, [hit], [30], [104])
    assert drafter.states["hit"].first_pos == 30


@torch.inference_mode()
def test_fused_chain_drafts_greedy_batches(mtp):
    """An all-greedy batch takes `mtp_chain` (one call for the whole chain) and matches the
    reference, ragged contexts and chains cut short included; the committed rows stay as they
    were (the chain's rows are scratch past them)."""
    drafter = _drafter(mtp, "fused")
    calls = []
    real = type(drafter.fused).__call__
    type(drafter.fused).__call__ = lambda self, *a: calls.append(1) or real(self, *a)
    try:
        streams = [Stream(str(i), 300, 20 + i) for i in range(4)]
        ns = [5, 70, 130, 200]
        for s, n in zip(streams, ns, strict=True):
            s.commit(n, 0, drafter)
        proposals = _check(drafter, mtp, streams, [0] * 4, ns)
        assert calls == [1] and all(len(p.tokens) == K for p in proposals)
        assert [drafter.states[s.req.request_id].rows.length for s in streams] == [
            n - 1 for n in ns
        ]
        short = drafter.propose([s.req for s in streams], [K, 1, 2, K])
        assert [len(p.tokens) for p in short] == [K, 1, 2, K]
        assert [p.tokens for p in short] == [
            p.tokens[: len(q.tokens)] for p, q in zip(proposals, short, strict=True)
        ]
    finally:
        type(drafter.fused).__call__ = real


@torch.inference_mode()
def test_kernel_and_pytorch_path_draft_the_same(mtp):
    kernels.load()
    drafters = [MTPDrafter(mtp, K), MTPDrafter(mtp, K)]
    drafters[1].kernel = True
    outs = []
    for drafter in drafters:
        streams = [Stream(str(i), 260, 10 + i) for i in range(5)]
        for i, s in enumerate(streams):
            s.commit(40 * i + 5, 0, drafter)
        outs.append(drafter.propose([s.req for s in streams], [K, 2, K, 1, K]))
    for a, b in zip(*outs, strict=True):
        assert a.tokens == b.tokens and len(a.tokens) > 0
        torch.testing.assert_close(a.confidences, b.confidences, atol=1e-5, rtol=1e-5)
