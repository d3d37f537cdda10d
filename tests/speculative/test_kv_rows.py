"""`RowAttention` over per-request `KVRows`, the C++ kernel and the PyTorch path, against the
plain math it replaces: per request, the committed rows concatenated with the new ones and one
SDPA, causal over the new rows. Ragged contexts, any number of new rows, GQA, chained
forwards that see the rows before them, and buffers that grow while keeping their rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specserve import kernels
from specserve.speculative.kv_rows import KVRows, RowAttention


@pytest.fixture(scope="module", params=[False, True], ids=["torch", "cpp"])
def kernel(request) -> bool:
    if request.param:
        kernels.load()
    return request.param


def _reference(q, k, v, prefix_k, prefix_v):
    """One request the plain way: keys = [prefix; new], new row j sees prefix + rows 0..j."""
    keys, vals = torch.cat([prefix_k, k]), torch.cat([prefix_v, v])
    n, total = q.shape[0], keys.shape[0]
    mask = torch.arange(total)[None, :] <= total - n + torch.arange(n)[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        keys.transpose(0, 1)[None],
        vals.transpose(0, 1)[None],
        attn_mask=mask,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("head_dim", [8, 64, 128])  # the generic path and both specialised
@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (8, 1)])  # GQA group 2, MHA, MQA
def test_ragged_forwards_equal_the_plain_math(kernel, head_dim, heads):
    h, kvh = heads
    gen = torch.Generator().manual_seed(head_dim + h)
    prefixes = [0, 5, 150, 64, 1]  # a prompt, short and long contexts (tiles of 64 keys)
    news = [70, 1, 3, 1, 130]  # any number of new rows, causal among themselves
    rows, ref_k, ref_v = [], [], []
    for n in prefixes:
        kv = KVRows(kvh, head_dim, torch.empty(0))
        kv.reserve(n)
        ref_k.append(torch.randn(n, kvh, head_dim, generator=gen))
        ref_v.append(torch.randn(n, kvh, head_dim, generator=gen))
        kv.k[:, :n], kv.v[:, :n] = ref_k[-1].transpose(0, 1), ref_v[-1].transpose(0, 1)
        kv.length = n
        rows.append(kv)
    for kv, n in zip(rows, news, strict=True):
        kv.reserve(kv.length + n + 2)
    ctx = RowAttention(rows, prefixes, news, kernel)
    for step_news in (news, [1] * len(news), [1] * len(news)):  # a catch-up, two chain steps
        total = sum(step_news)
        q = torch.randn(total, h, head_dim, generator=gen)
        k = torch.randn(total, kvh, head_dim, generator=gen)
        v = torch.randn(total, kvh, head_dim, generator=gen)
        ctx.query_lens = torch.tensor(step_news)
        out = ctx.attend(0, q, k, v)
        first = 0
        for r, n in enumerate(step_news):
            sl = slice(first, first + n)
            want = _reference(q[sl], k[sl], v[sl], ref_k[r], ref_v[r])
            torch.testing.assert_close(out[sl], want, atol=2e-5, rtol=1e-4)
            ref_k[r], ref_v[r] = torch.cat([ref_k[r], k[sl]]), torch.cat([ref_v[r], v[sl]])
            end = ref_k[r].shape[0]
            assert torch.equal(rows[r].k[:, :end], ref_k[r].transpose(0, 1))
            assert torch.equal(rows[r].v[:, :end], ref_v[r].transpose(0, 1))
            first += n
    assert ctx.starts.tolist() == [p + n + 2 for p, n in zip(prefixes, news, strict=True)]


def test_reserve_keeps_the_committed_rows_only():
    kv = KVRows(2, 4, torch.empty(0))
    kv.reserve(3)
    assert kv.k.shape == (2, 64, 4)  # the smallest buffer, head-major
    kv.k[:, :5] = torch.arange(5.0)[None, :, None]
    kv.length = 3  # rows 3, 4: a chain's scratch
    before = kv.k
    kv.reserve(64)
    assert kv.k is before  # it fits: nothing moves
    kv.reserve(65)
    assert kv.k.shape == (2, 130, 4) and kv.k[1, :3, 0].tolist() == [0.0, 1.0, 2.0]


def test_the_kernel_refuses_rows_that_do_not_fit():
    kernels.load()
    kv = KVRows(1, 8, torch.empty(0))
    kv.reserve(1)
    ctx = RowAttention([kv], [64], [1], kernel=True)  # row 64 of a 64-row buffer
    with pytest.raises(RuntimeError, match="do not fit"):
        ctx.attend(0, torch.randn(1, 1, 8), torch.randn(1, 1, 8), torch.randn(1, 1, 8))
