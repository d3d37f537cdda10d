"""The drafter networks: the packed training forward never sees the future, and the inference
path (incremental context K/V) computes exactly what the training forward computes."""

import pytest
import torch

from specserve.config import ModelConfig
from specserve.speculative.draft_config import DraftConfig
from specserve.speculative.dspark import DSparkDraftModel
from specserve.speculative.kv_rows import KVRows, RowAttention
from specserve.speculative.mtp import MTPModule
from specserve.testing.tiny import tiny_config

TARGET = tiny_config(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def _dspark(kind: str = "vanilla", **kw) -> DSparkDraftModel:
    torch.manual_seed(0)
    cfg = DraftConfig.from_target(
        TARGET,
        2,
        target_layer_ids=[-1, 1],
        block_size=4,
        mask_token_id=3,
        markov_rank=8,
        markov_head_type=kind,
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        **kw,
    )
    return DSparkDraftModel(cfg).eval()


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_blocks_never_see_the_future(kind):
    m = _dspark(kind)
    ids = torch.randint(0, 64, (2, 16))
    hid = torch.randn(2, 16, 64)
    anchors = torch.tensor([[2, 7, 11], [0, 5, 9]])
    out = m(ids, hid, anchors)
    # change everything from position 7 on (hidden states and tokens after the anchor)
    ids2, hid2 = ids.clone(), hid.clone()
    ids2[:, 8:] = (ids2[:, 8:] + 1) % 64
    hid2[:, 7:] += 1.0
    out2 = m(ids2, hid2, anchors)
    torch.testing.assert_close(out.base_logits[0, :2], out2.base_logits[0, :2])
    torch.testing.assert_close(out.base_logits[1, :2], out2.base_logits[1, :2])
    # ... but a block after the change does see it
    assert not torch.allclose(out.base_logits[0, 2], out2.base_logits[0, 2])
    assert out.confidence_logits.shape == (2, 3, 4)
    # teacher forcing: slot k's Markov bias reads target_ids[k - 1]; slot 0 reads the anchor
    assert torch.equal(out.target_ids[0, 0], ids[0, 3:7])


def test_packed_blocks_equal_single_blocks():
    m = _dspark("rnn")
    ids, hid = torch.randint(0, 64, (1, 16)), torch.randn(1, 16, 64)
    packed = m(ids, hid, torch.tensor([[3, 9]]))
    for a, anchor in enumerate((3, 9)):
        single = m(ids, hid, torch.tensor([[anchor]]))
        torch.testing.assert_close(packed.logits[0, a], single.logits[0, 0])


def test_inference_path_matches_training_forward():
    m = _dspark("gated")
    ids, hid = torch.randint(0, 64, (1, 12)), torch.randn(1, 12, 64)
    anchor = 8
    ref = m(ids, hid, torch.tensor([[anchor]]))
    # context K/V grown in two pieces, as the engine's updates would deliver it
    parts = [m.context_kv(hid[0, s:e], torch.arange(s, e)) for s, e in ((0, 5), (5, anchor))]
    ctx = [tuple(torch.cat([p[i][j] for p in parts]) for j in (0, 1)) for i in range(2)]
    other = [tuple(t[:3] for t in layer) for layer in ctx]  # a second, shorter request
    h = m.draft_hidden(ids[0, [anchor, 2]], torch.tensor([anchor, 3]), [ctx, other], 4)
    torch.testing.assert_close(h[0], ref.hidden[0, 0], atol=1e-5, rtol=1e-5)
    alone = m.draft_hidden(ids[0, [2]], torch.tensor([3]), [other], 4)
    torch.testing.assert_close(h[1], alone[0], atol=1e-5, rtol=1e-5)


def test_a_block_at_the_end_of_the_context_drafts():
    """The batch drafts k slots for every request; one whose anchor sits near the last position
    the model has must not index past its RoPE table (its extra slots are discarded)."""
    m = _dspark()
    last = TARGET["max_position_embeddings"] - 1
    ctx = [m.context_kv(torch.randn(5, 64), torch.arange(last - 6, last - 1))]
    ctx = [tuple(t for t in layer) for layer in ctx[0]]
    h = m.draft_hidden(torch.tensor([7]), torch.tensor([last - 1]), [ctx], 4)
    assert h.shape == (1, 4, 32) and torch.isfinite(h).all()


def test_mtp_incremental_equals_causal():
    torch.manual_seed(0)
    mtp = MTPModule(ModelConfig.from_dict(TARGET)).eval()
    ids, hid = torch.randint(0, 64, (1, 10)), torch.randn(1, 10, 32)
    ref = mtp(ids, hid)
    x = mtp.combine(ids[0, 1:], hid[0, :-1])
    rows = KVRows(2, 8, x)
    rows.reserve(9)
    out1 = mtp.layer(x[:4], torch.arange(4), RowAttention([rows], [0], [4], kernel=False))
    out2 = mtp.layer(x[4:], torch.arange(4, 9), RowAttention([rows], [4], [5], kernel=False))
    torch.testing.assert_close(torch.cat([out1, out2]), ref.hidden[0], atol=1e-5, rtol=1e-5)
