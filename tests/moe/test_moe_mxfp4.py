"""Serving MoE experts in MXFP4: converted checkpoints, quantise-on-load, memory, greedy output."""

from __future__ import annotations

import pytest
import torch

from specserve.config import CacheConfig, EngineConfig
from specserve.core import SamplingParams
from specserve.engine.engine import LLMEngine
from specserve.models.attention import CausalAttention
from specserve.models.layers import GatedMLP
from specserve.models.loader import load_model
from specserve.models.qwen3_moe import MXFP4MLP, SparseMoeBlock, expert_bytes
from specserve.quant.convert import convert_checkpoint


@pytest.fixture(scope="module")
def mxfp4_path(tiny_moe_path, tmp_path_factory) -> str:
    return str(convert_checkpoint(tiny_moe_path, tmp_path_factory.mktemp("q") / "mxfp4").out_dir)


def _experts(model) -> list:
    return [e for m in model.modules() if isinstance(m, SparseMoeBlock) for e in m.experts.values()]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids, torch.arange(len(ids)), CausalAttention(1, len(ids)))
        return model.compute_logits(out.hidden)


def test_mxfp4_checkpoint_serves_its_dequantised_weights(mxfp4_path):
    """MXFP4 experts compute exactly what dense experts holding the dequantised values do."""
    q, _ = load_model(mxfp4_path)  # detected from quantization_config
    d, _ = load_model(mxfp4_path, moe_backend="torch")
    assert all(isinstance(e, MXFP4MLP) for e in _experts(q)) and _experts(q)
    assert all(isinstance(e, GatedMLP) for e in _experts(d))
    q.fuse()
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(0))
    assert (_logits(q, ids) - _logits(d, ids)).abs().max().item() <= 1e-4


def test_quantise_on_load_equals_converted_checkpoint(tiny_moe_path, mxfp4_path):
    a, _ = load_model(tiny_moe_path, moe_backend="mxfp4")
    b, _ = load_model(mxfp4_path)
    bufs_a, bufs_b = dict(a.named_buffers()), dict(b.named_buffers())
    names = [n for n in bufs_b if n.endswith(("_blocks", "_scales"))]
    assert names and all(torch.equal(bufs_a[n], bufs_b[n]) for n in names)


def test_expert_memory_is_4_25_bits_per_parameter(tiny_moe_path, mxfp4_path):
    dense, _ = load_model(tiny_moe_path)
    q, _ = load_model(mxfp4_path)
    dense.fuse(), q.fuse()  # fusing gate/up must not keep a second copy
    ratio = expert_bytes(dense) / expert_bytes(q)
    assert ratio == pytest.approx(32 / 4.25, rel=1e-3)


def _greedy(path: str, prompts: list[list[int]], **kw) -> list[list[int]]:
    cfg = EngineConfig(model_path=path, cache=CacheConfig(page_size=8, max_total_tokens=2048))
    engine = LLMEngine(cfg, **kw)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [r.output_token_ids for r in reqs]


def _top1_agreement(ref, quant, seqs: list[list[int]]) -> float:
    """Teacher-forced: fraction of positions where both models pick the same next token."""
    same = total = 0
    for seq in seqs:
        ids = torch.tensor(seq)
        same += int((_logits(ref, ids).argmax(-1) == _logits(quant, ids).argmax(-1)).sum())
        total += len(seq)
    return same / total


def test_quantised_greedy_output_against_unquantised(tiny_moe_path, mxfp4_path):
    prompts = [[i, i + 7, i + 30, i + 1] for i in range(40, 400, 45)]
    ref = _greedy(tiny_moe_path, prompts)
    quant = _greedy(mxfp4_path, prompts)  # the converted checkpoint, served
    exact = sum(a == b for a, b in zip(ref, quant, strict=True)) / len(ref)
    prefix = [
        next((i for i, (s, t) in enumerate(zip(a, b, strict=True)) if s != t), len(a)) / len(a)
        for a, b in zip(ref, quant, strict=True)
    ]
    seqs = [p + o for p, o in zip(prompts, ref, strict=True)]
    top1 = _top1_agreement(load_model(tiny_moe_path)[0], load_model(mxfp4_path)[0], seqs)
    print(
        f"MXFP4 vs unquantised: {exact:.0%} of outputs identical, "
        f"{sum(prefix) / len(prefix):.0%} of tokens before the first difference, "
        f"next-token agreement {top1:.1%} (teacher-forced)"
    )
    assert top1 >= 0.8  # a broken MXFP4 path (wrong nibble order, scale) scores near 0
