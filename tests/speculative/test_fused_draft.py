"""The fused greedy draft step (`torch.ops.specserve.draft_block`, `fused_draft.py`) drafts the
same tokens as the PyTorch path, with the same confidences to float32 rounding, for DSpark
(vanilla Markov head with and without the Markov input to the confidence head, no Markov head)
and DFlash; and serving through it stays lossless."""

from __future__ import annotations

import pytest
import torch

from specserve import kernels
from specserve.core import SamplingParams
from specserve.models.qwen3 import tile_products
from specserve.speculative.dflash import DFlashDraftModel
from specserve.speculative.draft_config import DraftConfig
from specserve.speculative.dspark import DSparkDraftModel
from specserve.speculative.fused_draft import FusedDraft
from specserve.testing.tiny import tiny_config

from .conftest import PROMPTS, make_llm

# Sizes that are not multiples of the kernels' 64-column tiles (vocab, intermediate).
TARGET = tiny_config(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # the generic attention path; 64 and 128 are specialised (test_head_sizes)
    max_position_embeddings=96,
)
BLOCK = 7  # one request: 7 rows, one pass per weight tile (`block_gemm`); a batch: 6 + rest
DRAFTERS = {
    "dspark": dict(markov_rank=24, enable_confidence_head=True, confidence_head_with_markov=True),
    "dspark-conf-without-markov": dict(
        markov_rank=24, enable_confidence_head=True, confidence_head_with_markov=False
    ),
    "dspark-no-markov": dict(markov_rank=0, enable_confidence_head=True),
    "dspark-no-heads": dict(markov_rank=24, enable_confidence_head=False),
    "dflash": None,
}


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    kernels.load()


def _drafter(
    name: str, layers: int = 2, head_dim: int = 16, positions: int = 96
) -> DFlashDraftModel:
    torch.manual_seed(0)
    extra = DRAFTERS[name]
    target = {**TARGET, "head_dim": head_dim, "max_position_embeddings": positions}
    common = dict(target_layer_ids=[-1, 1], block_size=BLOCK, mask_token_id=3)
    if extra is None:
        model = DFlashDraftModel(DraftConfig.from_target(target, layers, **common))
    else:
        cfg = DraftConfig.from_target(target, layers, markov_head_type="vanilla", **common, **extra)
        model = DSparkDraftModel(cfg)
    with torch.no_grad():  # non-trivial norms, so that a swapped weight shows
        for name_, p in model.named_parameters():
            if "norm" in name_:
                p.uniform_(0.5, 1.5)
    model.eval().requires_grad_(False)
    tile_products(model)  # as the factory does under --attention-backend cpp
    return model


def _contexts(model: DFlashDraftModel, lengths: list[int]):
    """Per request, its projected context rows 0 .. L_r - 1, grown in two pieces as serving
    does (the second piece may end before the anchor when rows are still deferred)."""
    out = []
    for n in lengths:
        hid = torch.randn(n, 2 * TARGET["hidden_size"])
        cut = n // 2
        parts = [model.context_kv(hid[s:e], torch.arange(s, e)) for s, e in ((0, cut), (cut, n))]
        out.append(
            [
                tuple(torch.cat([p[i][j] for p in parts]) for j in (0, 1))
                for i in range(len(parts[0]))
            ]
        )
    return out


def _torch_path(model, anchor, positions, contexts):
    """What `DFlashDrafter.propose` computes for greedy requests without the fused step."""
    hidden = model.draft_hidden(anchor, positions, contexts, BLOCK)
    pick = lambda logits: (logits.argmax(-1), torch.softmax(logits, -1).max(-1).values)  # noqa: E731
    tokens, proxy = model.draft(hidden, anchor, pick)
    conf = model.block_confidence_logits(hidden, anchor, tokens)
    return tokens, proxy if conf is None else conf


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("name", list(DRAFTERS))
def test_fused_step_equals_the_torch_path(name, layers):
    _check_against_torch(_drafter(name, layers))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_head_sizes(head_dim):
    _check_against_torch(_drafter("dspark", 2, head_dim))


def _check_against_torch(model: DFlashDraftModel) -> None:
    fused = FusedDraft.of(model)
    assert fused is not None
    last = TARGET["max_position_embeddings"] - 1
    # ragged contexts; the last request's block runs past the end of the RoPE table (clamped)
    lengths, positions = [7, 30, 1, last - 1], [7, 31, 1, last - 1]
    contexts = _contexts(model, lengths)
    anchor = torch.tensor([5, 17, 299, 3])
    pos = torch.tensor(positions)
    want_tokens, want_conf = _torch_path(model, anchor, pos, contexts)
    tokens, conf = fused(anchor, pos, contexts, BLOCK)
    assert tokens.dtype == torch.long and tokens.shape == (4, BLOCK)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(conf, want_conf, atol=1e-5, rtol=1e-5)
    # each request alone drafts what it drafts in the batch
    for r in range(4):
        alone, _ = fused(anchor[r : r + 1], pos[r : r + 1], contexts[r : r + 1], BLOCK)
        assert torch.equal(alone[0], tokens[r])
    # the hidden rows alone (sampled batches pick from them in PyTorch)
    hidden = fused.hidden(anchor, pos, contexts, BLOCK)
    want_hidden = model.draft_hidden(anchor, pos, contexts, BLOCK)
    assert hidden.shape == want_hidden.shape == (4, BLOCK, TARGET["hidden_size"])
    torch.testing.assert_close(hidden, want_hidden, atol=1e-5, rtol=1e-5)


def test_long_contexts_split_across_threads_with_the_same_bits():
    """Requests drafting over long contexts split the block attention across threads by
    (request, KV head): the same tokens and the same bits as on one thread, and as the PyTorch
    path to float32 rounding."""
    model = _drafter("dspark", 1, 64, positions=4096)
    fused = FusedDraft.of(model)
    lengths = [1500, 2100, 900, 1800]
    contexts = _contexts(model, lengths)
    anchor, pos = torch.tensor([5, 17, 299, 3]), torch.tensor(lengths)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(anchor, pos, contexts, BLOCK), fused.hidden(anchor, pos, contexts, BLOCK)
        torch.set_num_threads(2)
        two = fused(anchor, pos, contexts, BLOCK), fused.hidden(anchor, pos, contexts, BLOCK)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0][0], two[0][0]) and torch.equal(one[0][1], two[0][1])
    assert torch.equal(one[1], two[1])
    want_tokens, want_conf = _torch_path(model, anchor, pos, contexts)
    assert torch.equal(two[0][0], want_tokens)
    torch.testing.assert_close(two[0][1], want_conf, atol=1e-5, rtol=1e-5)


def test_argmax_ties_pick_the_first_maximum():
    """Equal logits (two equal LM head rows; every other row zero): torch.argmax takes the first
    of them, so must the fused step, or the drafts would differ from the PyTorch path's."""
    model = _drafter("dflash")
    head = torch.zeros(TARGET["vocab_size"], TARGET["hidden_size"])
    head[[7, 11]] = torch.randn(TARGET["hidden_size"])
    model.lm_head.weight.data.copy_(head)
    del model.lm_head.weight.tiled
    tile_products(model)
    fused = FusedDraft.of(model)
    contexts = _contexts(model, [9, 4])
    anchor, pos = torch.tensor([5, 6]), torch.tensor([9, 4])
    tokens, _ = fused(anchor, pos, contexts, BLOCK)
    assert torch.equal(tokens, _torch_path(model, anchor, pos, contexts)[0])
    assert set(tokens.flatten().tolist()) <= {0, 7}


def test_drafters_the_fused_step_does_not_fit_keep_the_torch_path():
    assert FusedDraft.of(_drafter("dspark")) is not None
    untiled = DSparkDraftModel(_drafter("dspark").config)
    assert FusedDraft.of(untiled) is None  # --attention-backend torch: nothing tiled
    for kind in ("gated", "rnn"):
        torch.manual_seed(0)
        cfg = DraftConfig.from_target(
            TARGET,
            1,
            target_layer_ids=[-1, 1],
            block_size=BLOCK,
            mask_token_id=3,
            markov_rank=24,
            markov_head_type=kind,
        )
        model = DSparkDraftModel(cfg).eval()
        tile_products(model)
        assert FusedDraft.of(model) is None


@pytest.mark.parametrize("algorithm", ["DFLASH", "DSPARK"])
def test_serving_drafts_through_the_fused_step(bundle, algorithm):
    """Greedy serving on the cpp backend drafts through the fused step, every proposal equal to
    the PyTorch path's on the same state, and the output equals plain decoding."""
    plain = make_llm(bundle)
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (20, 6, 12, 24, 8, 16)]
    reference = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, params)]
    llm = make_llm(bundle, algorithm, attention_backend="cpp")
    drafter = llm.engine.drafter
    assert drafter.fused is not None
    propose, calls = drafter.propose, []

    def both(requests, max_tokens):
        got = propose(requests, max_tokens)
        fused, drafter.fused = drafter.fused, None
        try:
            want = propose(requests, max_tokens)  # the same contexts: all rows were folded in
        finally:
            drafter.fused = fused
        for g, w in zip(got, want, strict=True):
            assert g.tokens == w.tokens and g.probs is None and w.probs is None
            if w.confidences is not None:
                torch.testing.assert_close(g.confidences, w.confidences, atol=1e-5, rtol=1e-5)
        calls.append(sum(len(g.tokens) for g in got))
        return got

    drafter.propose = both
    outs = llm.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert len(calls) > 5 and sum(calls) > 0
    assert llm.engine.stats.num_draft_tokens > 0


def test_sampled_requests_take_only_the_hidden_rows(bundle):
    """A batch with a sampled request takes the block's hidden rows from C++ and picks in
    PyTorch (which reports q), never the fused greedy picks."""
    llm = make_llm(bundle, "DSPARK", attention_backend="cpp")
    drafter = llm.engine.drafter
    fused, seen = drafter.fused, {"step": 0, "hidden": 0}
    assert fused is not None

    class Spy:
        has_confidence_head = fused.has_confidence_head

        def __call__(self, *args):
            seen["step"] += 1
            return fused(*args)

        def hidden(self, *args):
            seen["hidden"] += 1
            return fused.hidden(*args)

        def context_kv(self, *args):
            return fused.context_kv(*args)

    drafter.fused = Spy()
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=12, temperature=1.0, seed=1))
    assert seen == {"step": 0, "hidden": seen["hidden"]} and seen["hidden"] > 0
    assert llm.engine.stats.num_draft_tokens > 0
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=12, temperature=0))
    assert seen["step"] > 0


@pytest.mark.parametrize("name", ["dspark", "dflash"])
def test_fused_context_rows_equal_the_torch_path(name):
    """The catch-up's projection of committed target hidden states (`draft_context`)."""
    model = _drafter(name)
    fused = FusedDraft.of(model)
    hid = torch.randn(9, 2 * TARGET["hidden_size"])
    for rows, pos in (
        (hid, torch.arange(9)),
        (hid[:1], torch.tensor([95])),
        (hid[:7], torch.arange(40, 47)),
    ):
        got, want = fused.context_kv(rows, pos), model.context_kv(rows, pos)
        assert len(got) == len(want) == 2
        for (gk, gv), (wk, wv) in zip(got, want, strict=True):
            torch.testing.assert_close(gk, wk, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gv, wv, atol=1e-5, rtol=1e-5)
