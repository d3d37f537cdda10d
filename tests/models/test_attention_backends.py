"""`--attention-backend cpp` (the compiled paged-attention kernel) against the pure PyTorch
backend on random caches, and against `transformers` logits at the head sizes the kernel
specialises (64, 128) and a generic one."""

from __future__ import annotations

import pytest
import torch
import transformers

from specserve.config import EngineConfig
from specserve.engine.model_runner import BatchSeq, ModelRunner
from specserve.models.attention import CppBackend, PagedBatch, TorchBackend, make_attention_backend
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


@pytest.mark.parametrize(
    ("head_dim", "heads", "kv", "dtype", "tol"),
    [
        (64, 4, 2, torch.float32, 2e-6),
        (128, 8, 2, torch.float32, 2e-6),
        (16, 4, 4, torch.float32, 2e-6),  # the generic (not specialised) head size
        (64, 12, 4, torch.bfloat16, 2e-2),
    ],
)
def test_kernel_equals_the_torch_backend(head_dim, heads, kv, dtype, tol):
    """Decode, verify windows up to the short-query limit, a prefill chunk after a prefix and
    one with no prefix, in one batch; page-edge lengths; the cache writes are identical too."""
    gen = torch.Generator().manual_seed(head_dim + heads)
    page = 16
    qlens = [1, 16, 3, 40, 1, 8, 5, 1]
    klens = [1, 300, 17, 40, 1024, 64, 133, 16]
    batch, num_blocks = _random_batch(qlens, klens, page, gen)
    torch_be, cpp_be = TorchBackend(), CppBackend()
    cache = torch_be.allocate(1, num_blocks, page, kv, head_dim, dtype, "cpu")[0]
    cache.copy_(torch.randn(cache.shape, generator=gen))
    n = sum(qlens)
    q, k, v = (torch.randn(n, c, head_dim, generator=gen).to(dtype) for c in (heads, kv, kv))
    caches = [[cache.clone()], [cache.clone()]]
    want = torch_be.context(caches[0], batch).attend(0, q, k, v)
    got = cpp_be.context(caches[1], batch).attend(0, q, k, v)
    assert got.dtype == dtype
    assert (got.float() - want.float()).abs().max().item() <= tol
    assert torch.equal(caches[0][0], caches[1][0])


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


def test_backend_names_and_devices():
    assert isinstance(make_attention_backend("cpp"), CppBackend)
    with pytest.raises(ValueError, match="is not one of"):
        make_attention_backend("flashinfer")
    with pytest.raises(ValueError, match="CPU only"):
        CppBackend().allocate(1, 4, 16, 2, 64, torch.float32, "meta")
    assert EngineConfig(model_path="m", attention_backend="cpp").attention_backend == "cpp"
