"""Our model code against Hugging Face transformers on the same random checkpoint."""

from __future__ import annotations

import pytest
import torch
import transformers

from specserve.core import SamplingParams
from specserve.engine.model_runner import BatchSeq, ModelRunner
from specserve.llm import LLM
from specserve.models.attention import CausalAttention, PagedAttention
from specserve.models.loader import load_model

BACKENDS = pytest.mark.parametrize("backend", ["torch", "cpp"])  # --attention-backend


def _hf(path: str):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("which", ["tiny_model_path", "tiny_llama_path"])
def test_prefill_logits_match(which, request):
    path = request.getfixturevalue(which)
    ours, _ = load_model(path)
    ref = _hf(path)
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        out = ours(ids.reshape(-1), torch.arange(37).repeat(2), CausalAttention(2, 37))
        got = ours.compute_logits(out.hidden).view(2, 37, -1)
    assert (got - want).abs().max().item() <= 1e-4


@BACKENDS
def test_paged_decode_logits_match(tiny_model_path, backend):
    """Chunked prefill then one-token decode steps through the paged cache equal HF's logits."""
    runner, ref = _paged(tiny_model_path, 16, 4, backend)
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    blocks = list(range(8))
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = []
    # prefill in chunks of 7 (crossing page boundaries), then decode one token at a time
    pos = 0
    for chunk in (7, 7, 6):
        r = runner.forward([BatchSeq(ids[pos : pos + chunk], pos, blocks, 0)])
        got.append(r.logits)
        pos += chunk
    while pos < len(ids):
        got.append(runner.forward([BatchSeq(ids[pos : pos + 1], pos, blocks, 0)]).logits)
        pos += 1
    assert (torch.cat(got) - want).abs().max().item() <= 1e-4


def test_hidden_state_capture_matches_hf(tiny_model_path):
    ours, cfg = load_model(tiny_model_path)
    ref = _hf(tiny_model_path)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    layers = (-1, 0, cfg.num_hidden_layers - 1)
    with torch.no_grad():
        hs = ref(ids, output_hidden_states=True).hidden_states
        out = ours(ids[0], torch.arange(12), CausalAttention(1, 12), capture=layers)
    want = torch.cat([hs[i + 1] for i in layers], dim=-1)[0]
    assert (out.captured - want).abs().max().item() <= 1e-4


@BACKENDS
@pytest.mark.parametrize("which", ["tiny_model_path", "tiny_llama_path"])
def test_greedy_generation_is_token_identical(which, backend, request):
    path = request.getfixturevalue(which)
    ref = _hf(path)
    llm = LLM(path, max_total_tokens=4096, page_size=8, attention_backend=backend)
    prompts = [[5, 17, 300, 42], list(range(100, 133))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        ids = list(prompt)
        with torch.no_grad():  # plain greedy loop on the reference (no EOS handling)
            for _ in range(64):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
        assert out.outputs[0].token_ids == ids[len(prompt) :]


def _paged(path: str, num_blocks: int = 64, page_size: int = 4, backend: str = "torch"):
    ours, _ = load_model(path)
    ours.fuse()
    runner = ModelRunner(
        ours, num_blocks, page_size, torch.float32, "cpu", attention_backend=backend
    )
    return runner, _hf(path)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]


@BACKENDS
def test_chunked_prefill_after_prefix_hit_matches_hf(tiny_model_path, backend):
    """A second sequence shares the first one's full prefix pages and prefills the rest in one
    long chunk that reads those pages from the cache."""
    runner, ref = _paged(tiny_model_path, backend=backend)
    prefix, a_tail, b_tail = _ids(24, 3), _ids(5, 4), _ids(21, 5)
    a_blocks, b_blocks = list(range(10, 18)), [10, 11, 12, 13, 14, 15, *range(30, 36)]
    runner.forward([BatchSeq(prefix + a_tail, 0, a_blocks, 29)])
    got = runner.forward([BatchSeq(b_tail, 24, b_blocks, 0)]).logits
    want = _hf_logits(ref, prefix + b_tail)[24:]
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("backend", "group_bytes"),
    [("torch", PagedAttention.GROUP_BYTES), ("torch", 1), ("cpp", PagedAttention.GROUP_BYTES)],
)
def test_mixed_verify_windows_and_prefill_in_one_batch_match_hf(
    tiny_model_path, backend, group_bytes, monkeypatch
):
    """Decode, verify windows of several lengths and a prefill chunk, on contexts of very
    different lengths (several length buckets), in one forward; with a tiny `GROUP_BYTES`
    every sequence is attended in a group of its own."""
    monkeypatch.setattr(PagedAttention, "GROUP_BYTES", group_bytes)
    runner, ref = _paged(tiny_model_path, num_blocks=301, backend=backend)
    contexts = [_ids(n, 10 + n) for n in (7, 150, 31, 3, 160, 64)]
    windows = [1, 16, 4, 9, 1, 20]
    tables = [list(range(1 + 50 * i, 51 + 50 * i)) for i in range(len(contexts))]
    # the last sequence's context arrives in the same batch as the others' windows
    runner.forward([BatchSeq(c, 0, t, len(c)) for c, t in zip(contexts[:-1], tables, strict=False)])
    seqs, want = [], []
    for i, (ctx, w, table) in enumerate(zip(contexts, windows, tables, strict=True)):
        new = _ids(w, 100 + i)
        last = i == len(contexts) - 1
        seqs.append(BatchSeq(ctx + new if last else new, 0 if last else len(ctx), table, 0))
        full = _hf_logits(ref, ctx + new)
        want.append(full if last else full[len(ctx) :])
    got = runner.forward(seqs).logits
    assert (got - torch.cat(want)).abs().max().item() <= 1e-4


@BACKENDS
def test_logits_after_rollback_match_hf(tiny_model_path, backend):
    """A verify window is rejected after 3 tokens; the next, shorter window overwrites only
    part of the rejected slots and must not see the stale K/V left behind."""
    runner, ref = _paged(tiny_model_path, backend=backend)
    ctx, rejected, accepted = _ids(13, 20), _ids(8, 21), _ids(2, 22)
    table = list(range(5, 15))
    runner.forward([BatchSeq(ctx, 0, table, 13)])
    runner.forward([BatchSeq(rejected, 13, table, 0)])
    keep = ctx + rejected[:3]
    got = runner.forward([BatchSeq(accepted, len(keep), table, 0)]).logits
    want = _hf_logits(ref, keep + accepted)[len(keep) :]
    assert (got - want).abs().max().item() <= 1e-4
