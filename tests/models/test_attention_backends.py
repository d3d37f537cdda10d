"""`--attention-backend cpp` (the compiled paged-attention kernel) against the pure PyTorch
backend on random caches, and against `transformers` logits at the head sizes the kernel
specialises (64, 128) and a generic one."""

from __future__ import annotations

import os
import time

import pytest
import torch
import transformers

from specserve.config import EngineConfig
from specserve.engine.model_runner import BatchSeq, ModelRunner
from specserve.kernels import STALE_LOCK_S, clear_stale_lock
from specserve.models.attention import (
    CppBackend,
    PagedBatch,
    TorchBackend,
    keys_transposed,
    keys_untransposed,
    make_attention_backend,
)
from specserve.models.loader import load_model
from specserve.testing.tiny import make_checkpoint


def _random_batch(qlens, klens, page, gen):
    """Block tables of shuffled pages (page 0 unused) and the slots of each sequence's new
    tokens, the last `qlens[i]` of its `klens[i]`."""
    pages = [-(-k // page) for k in klens]
    perm = (torch.randperm(sum(pages) + 2, generator=gen) + 1).tolist()
    tables = torch.zeros(len(qlens), max(pages), dtype=torch.long)
    slots, used = [], 0
    for i, (q, k) in enumerate(zip(qlens, klens, strict=True)):
        tables[i, : pages[i]] = torch.tensor(perm[used : used + pages[i]])
        used += pages[i]
        slots += [int(tables[i, t // page]) * page + t % page for t in range(k - q, k)]
    batch = PagedBatch(torch.tensor(qlens), torch.tensor(klens), tables, torch.tensor(slots))
    return batch, sum(pages) + 3


BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    ("head_dim", "heads", "kv", "dtype", "tol", "page", "cache_dtype"),
    [
        (64, 4, 2, F32, 2e-6, 16, F32),
        (128, 8, 2, F32, 2e-6, 16, F32),
        (16, 4, 4, F32, 2e-6, 16, F32),  # the generic (not specialised) head size
        (64, 12, 4, BF16, 2e-2, 16, BF16),
        (64, 4, 2, F32, 2e-6, 8, F32),  # 8 pages per 64-key tile
        (128, 4, 1, F32, 2e-6, 128, F32),  # a page longer than a tile
        # --kv-cache-dtype: a 16-bit cache under float32 queries, widened as it is read
        (64, 4, 2, F32, 2e-6, 16, BF16),
        (128, 8, 2, F32, 2e-6, 16, F16),
        (16, 4, 4, F32, 2e-6, 16, BF16),
        (64, 4, 2, F32, 2e-6, 4, BF16),  # pages smaller than a score vector: keys copied
    ],
)
def test_kernel_equals_the_torch_backend(head_dim, heads, kv, dtype, tol, page, cache_dtype):
    """Decode, verify windows up to the short-query limit, a prefill chunk after a prefix and
    one with no prefix, in one batch; page-edge lengths; the cache writes are identical too
    (a 16-bit cache under float32 K/V: both round them the same way, to nearest even)."""
    gen = torch.Generator().manual_seed(head_dim + heads)
    qlens = [1, 16, 3, 40, 1, 8, 5, 1]
    klens = [1, 300, 17, 40, 1024, 64, 133, 16]
    batch, num_blocks = _random_batch(qlens, klens, page, gen)
    torch_be, cpp_be = TorchBackend(), CppBackend()
    cache = torch_be.allocate(1, num_blocks, page, kv, head_dim, cache_dtype, "cpu")[0]
    cache.copy_(torch.randn(cache.shape, generator=gen))
    n = sum(qlens)
    q, k, v = (torch.randn(n, c, head_dim, generator=gen).to(dtype) for c in (heads, kv, kv))
    caches = [[cache.clone()], [keys_transposed(cache)]]  # the same keys in each layout
    want = torch_be.context(caches[0], batch).attend(0, q, k, v)
    got = cpp_be.context(caches[1], batch).attend(0, q, k, v)
    assert got.dtype == dtype
    assert (got.float() - want.float()).abs().max().item() <= tol
    assert torch.equal(caches[0][0], keys_untransposed(caches[1][0]))


def test_long_queries_are_split_into_blocks_across_threads():
    """Prefill chunks longer than a query block (64), after a prefix and with none, next to
    decode and verify rows: the kernel matches the torch backend, and the bits do not depend
    on how many threads share the blocks."""
    gen = torch.Generator().manual_seed(11)
    qlens, klens = [150, 1, 130, 8, 65], [350, 900, 130, 500, 700]
    batch, num_blocks = _random_batch(qlens, klens, 16, gen)
    cache = TorchBackend().allocate(1, num_blocks, 16, 2, 64, torch.float32, "cpu")[0]
    cache.copy_(torch.randn(cache.shape, generator=gen))
    q, k, v = (torch.randn(sum(qlens), c, 64, generator=gen) for c in (4, 2, 2))
    want = TorchBackend().context([cache.clone()], batch).attend(0, q, k, v)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(CppBackend().context([keys_transposed(cache)], batch).attend(0, q, k, v))
    finally:
        torch.set_num_threads(threads)
    assert (outs[0] - want).abs().max().item() <= 2e-6
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_row_is_the_same_in_decode_and_verify(head_dim):
    """A query attended as the last row of a verify window, or as a row inside it, gives the
    same bits as the same query decoded alone: speculation cannot change a greedy token."""
    CppBackend()  # builds the kernels
    gen = torch.Generator().manual_seed(7)
    heads, kv, page, length = 4, 2, 16, 150
    cache = torch.randn(2, kv, 20, page, head_dim, generator=gen)
    table = torch.randperm(20, generator=gen)[: -(-length // page)]
    window = torch.randn(8, heads, head_dim, generator=gen)
    q = torch.cat([window, window[7:], window[3:4]])  # verify 8, then rows 7 and 3 decoded
    out = torch.empty_like(q)
    torch.ops.specserve.paged_attention(
        out, q, cache, table.expand(3, -1).contiguous(), torch.tensor([0, 8, 9]),
        torch.tensor([8, 1, 1]), torch.tensor([length, length, length - 4]), head_dim**-0.5,
    )  # fmt: skip
    assert torch.equal(out[7], out[8])
    assert torch.equal(out[3], out[9])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_and_verify_logits_match_hf(tmp_path, head_dim):
    """The kernel's specialised head sizes, end to end: a prefill in chunks, one-token decode
    steps, then a batch of verify windows of mixed lengths over different contexts."""
    path = make_checkpoint(tmp_path / "m", seed=3, head_dim=head_dim, num_attention_heads=4)
    ours, _ = load_model(str(path))
    ours.fuse()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runner = ModelRunner(ours, 80, 4, torch.float32, "cpu", attention_backend="cpp")
    gen = torch.Generator().manual_seed(head_dim)
    ctxs = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (23, 9, 41)]
    tables = [list(range(1 + 25 * i, 26 + 25 * i)) for i in range(3)]
    got, want = [], []
    for ctx, table in zip(ctxs, tables, strict=True):
        runner.forward([BatchSeq(ctx[:10], 0, table, 0)])
        for pos in range(10, len(ctx)):  # decode steps
            got.append(runner.forward([BatchSeq(ctx[pos : pos + 1], pos, table, 0)]).logits)
        with torch.no_grad():
            want.append(ref(torch.tensor([ctx])).logits[0, 10:])
    windows = [torch.randint(0, 512, (w,), generator=gen).tolist() for w in (8, 1, 5)]
    seqs = [BatchSeq(w, len(c), t, 0) for w, c, t in zip(windows, ctxs, tables, strict=True)]
    got.append(runner.forward(seqs).logits)
    with torch.no_grad():
        want += [
            ref(torch.tensor([c + w])).logits[0, len(c) :]
            for c, w in zip(ctxs, windows, strict=True)
        ]
    assert (torch.cat(got) - torch.cat(want)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_16_bit_cache_reads_the_same_whichever_step_wrote_it(tmp_path, backend):
    """`--kv-cache-dtype bfloat16`: one 40-token prefill with no cached prefix, a 16-token one
    and a 24-token chunk after it (its prefix read from the cache), and 16 tokens then one-token
    decode steps give the same logits: a chunk's own K/V are read rounded, as the cache holds
    them. Against `transformers` in float32 they differ by the rounding only."""
    path = make_checkpoint(tmp_path / "m", seed=4, head_dim=64, num_attention_heads=4)
    ours, _ = load_model(str(path))
    ours.fuse()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ctx = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    table = list(range(1, 11))

    def runner():
        return ModelRunner(ours, 12, 4, F32, "cpu", (), backend, BF16)

    whole = runner().forward([BatchSeq(ctx, 0, table, 39)]).logits[-1]
    chunked = runner()
    chunked.forward([BatchSeq(ctx[:16], 0, table, 16)])
    after_prefix = chunked.forward([BatchSeq(ctx[16:], 16, table, 23)]).logits[-1]
    stepped = runner()
    stepped.forward([BatchSeq(ctx[:16], 0, table, 16)])
    for pos in range(16, 40):
        last = stepped.forward([BatchSeq(ctx[pos : pos + 1], pos, table, 0)]).logits[-1]
    assert (after_prefix - whole).abs().max().item() <= 1e-5
    assert (last - whole).abs().max().item() <= 1e-5
    with torch.no_grad():
        want = ref(torch.tensor([ctx])).logits[0, -1]
    err = (whole - want).abs().max().item()
    assert 0 < err <= 2e-2 * want.abs().max().item()  # rounded K/V: near, not equal


def test_backend_names_and_devices():
    assert isinstance(make_attention_backend("cpp"), CppBackend)
    with pytest.raises(ValueError, match="is not one of"):
        make_attention_backend("flashinfer")
    with pytest.raises(ValueError, match="CPU only"):
        CppBackend().allocate(1, 4, 16, 2, 64, torch.float32, "meta")
    assert EngineConfig(model_path="m", attention_backend="cpp").attention_backend == "cpp"


@pytest.mark.parametrize(
    ("model_type", "head_dim", "tie", "saved", "kv_dtype"),
    [
        ("qwen3", 16, False, F32, None),
        ("llama", 64, True, F32, None),
        ("qwen3", 64, False, BF16, None),
        ("qwen3", 64, True, F16, None),
        ("qwen3", 64, False, F16, BF16),  # --kv-cache-dtype bfloat16
        ("qwen3", 16, False, F32, F16),
    ],
)
def test_fused_step_equals_the_layer_by_layer_path(
    tmp_path, monkeypatch, model_type, head_dim, tie, saved, kv_dtype
):
    """`dense_layers` (every layer in one call) against the PyTorch layers on the same cache
    contents: logits and the captured hidden states (embedding, a middle layer, the last one)
    of short prefills, decode steps, a batch of verify windows and a mixed step (a 20-token
    prefill chunk beside a decode). A checkpoint saved in 16 bits runs on 16-bit tiles; a
    16-bit K/V cache holds the same rounded keys and values in both."""
    from specserve.models.qwen3 import CausalLM

    path = make_checkpoint(
        tmp_path / "m",
        seed=5,
        dtype=saved,
        model_type=model_type,
        head_dim=head_dim,
        tie_word_embeddings=tie,
    )
    capture = (-1, 0, 1)
    runners = []
    for backend in ("torch", "cpp"):
        model, _ = load_model(str(path))
        model.fuse()
        runners.append(ModelRunner(model, 80, 4, torch.float32, "cpu", capture, backend, kv_dtype))
        assert runners[-1].kv_cache[0].dtype == (kv_dtype or torch.float32)
    assert runners[1].model._step_weights is not None
    tiles = {w.dtype for w in runners[1].model._step_weights if w.dim() == 3}
    assert tiles == {saved}
    fused_calls = []
    real = CausalLM._dense_step
    monkeypatch.setattr(
        CausalLM, "_dense_step", lambda self, *a: fused_calls.append(1) or real(self, *a)
    )
    gen = torch.Generator().manual_seed(7)
    ctxs = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (23, 9, 41)]
    tables = [list(range(1 + 25 * i, 26 + 25 * i)) for i in range(3)]
    steps = [[BatchSeq(c[:10], 0, t, 0) for c, t in zip(ctxs, tables, strict=True)]]
    steps += [
        [BatchSeq(c[p : p + 1], p, t, 0) for c, t in zip(ctxs, tables, strict=True)]
        for p in range(10, 20)
    ]
    steps.append(  # verify windows of 8, 1 and 5 tokens after each context's 20th token
        [
            BatchSeq(c[20 : 20 + w], 20, t, 0)
            for c, t, w in zip(ctxs, tables, (8, 1, 5), strict=True)
        ]
    )
    steps.append(  # a mixed step: one sequence prefills 20 tokens (a long query), one decodes
        [BatchSeq(ctxs[0][28:29], 28, tables[0], 0), BatchSeq(ctxs[2][20:40], 20, tables[2], 0)]
    )
    # The two paths' float32 K/V differ in the last bits (other sums); a 16-bit cache rounds a
    # value that sits near a rounding edge one way in one and the other way in the other, a
    # 16-bit ulp (2**-8 of it for bfloat16), so the tolerance is wider there.
    tol = 1e-4 if kv_dtype is None else 2e-3
    for seqs in steps:
        want, got = (r.forward(seqs) for r in runners)
        assert (got.logits - want.logits).abs().max().item() <= tol
        assert (got.captured - want.captured).abs().max().item() <= tol
    assert len(fused_calls) == len(steps)  # every step, prefill chunks included


def test_linear_tiled_is_row_invariant():
    """The kernels' product (`linear()` on a tiled weight) equals float64 to float32 rounding
    at any number of rows and column count, and each row's result is bit-identical whether it
    is computed alone or with others (a token's logits do not depend on its batch)."""
    from specserve.models.layers import linear, tile_for_kernels

    CppBackend()  # builds and loads the kernels
    gen = torch.Generator().manual_seed(0)
    for out_features, in_features in ((100, 37), (512, 256), (130, 64)):
        weight = torch.randn(out_features, in_features, generator=gen)
        ref = weight.clone()
        assert tile_for_kernels(weight) is not None
        for rows in (1, 2, 3, 5, 6, 7, 8, 13, 80):  # 1-2 rows: wider panels; 7-8: 6 + the rest
            x = torch.randn(rows, in_features, generator=gen)
            y = linear(x, weight)
            assert (y.double() - x.double() @ ref.double().t()).abs().max().item() < 1e-4
            for i in range(rows):
                assert torch.equal(linear(x[i : i + 1], weight)[0], y[i])
            assert torch.equal(linear(x[:2], weight), y[:2])


def test_16_bit_tiles_give_the_same_bits():
    """A weight whose values are all exact in bfloat16 or float16 (a checkpoint saved in 16 bits,
    loaded in float32) gets a 16-bit tiled copy, and the product from it is bit-identical to
    the product from the float32 tiles at every row count (one-row blocks, 8-row blocks, the
    widened passes over 9+ rows); any other weight keeps float32 tiles."""
    from specserve.models.layers import linear, tile_for_kernels, tile_weight

    CppBackend()
    gen = torch.Generator().manual_seed(0)
    for narrow in (torch.bfloat16, torch.float16, torch.float32):
        for out_features, in_features in ((130, 64), (256, 768)):
            weight = torch.randn(out_features, in_features, generator=gen).to(narrow).float()
            tiled = tile_for_kernels(weight)
            assert tiled is not None and tiled.dtype == narrow
            wide = tile_weight(weight)  # the float32 tiles
            for rows in (1, 2, 3, 8, 9, 13, 30, 80):
                x = torch.randn(rows, in_features, generator=gen)
                want = torch.empty(rows, out_features)
                torch.ops.specserve.linear_tiled(want, x, wide)
                assert torch.equal(linear(x, weight), want)


def test_fused_step_is_off_where_it_does_not_fit(tmp_path):
    """An MoE model keeps the layer-by-layer path (its products still use tiled weights)."""
    path = make_checkpoint(tmp_path / "moe", model_type="qwen3_moe", moe_intermediate_size=32)
    model, _ = load_model(str(path))
    model.fuse()
    runner = ModelRunner(model, 16, 4, torch.float32, "cpu", attention_backend="cpp")
    assert runner.model._step_weights is None
    assert hasattr(runner.model.lm_head.weight, "tiled")


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """torch's build waits forever on a lock file a killed build left; `load()` clears it."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "ext" / "lock"
    assert not clear_stale_lock("ext")  # no lock: nothing to do (the folder is made)
    lock.write_text("")
    assert not clear_stale_lock("ext") and lock.exists()  # a build may be running
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert clear_stale_lock("ext") and not lock.exists()
