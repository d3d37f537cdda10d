"""The official DeepSeek-V4 weight formats: FP8 e4m3 block-scaled (ue8m0) weights dequantised
at load, FP4 experts (int8, two codes per byte, E8M0 scale per 32) served as MXFP4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from specserve.config import SpecConfig
from specserve.core import SamplingParams
from specserve.llm import LLM
from specserve.models.deepseek_v4 import V4Context
from specserve.models.loader import load_model, load_state_dict
from specserve.models.qwen3_moe import MXFP4Linear
from specserve.quant.deepseek_fp import (
    FP8,
    dequantize_fp8_blocks,
    mxfp4_to_fp4,
    quantize_fp8_blocks,
)
from specserve.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from specserve.speculative.factory import build_speculation

BLOCK = 128
FP8_NAMES = ("wq_a.weight", "wq_b.weight", "wkv.weight", "wo_b.weight", "e_proj.weight")


def test_fp8_block_dequantisation_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 448.0]])
    q, s = quantize_fp8_blocks(w, 1)  # one block per element: exact powers of two
    assert s.dtype == torch.float8_e8m0fnu and q.dtype == FP8
    assert torch.equal(s.float(), torch.tensor([[1 / 256, 1 / 128], [1 / 128, 1.0]]))
    assert torch.equal(dequantize_fp8_blocks(q, s, 1), w)
    big = torch.randn(200, 130)
    q, s = quantize_fp8_blocks(big, BLOCK)  # partial edge blocks
    assert s.shape == (2, 2)
    assert (dequantize_fp8_blocks(q, s, BLOCK) - big).abs().max() <= big.abs().max() / 16


def _official(src: Path, out: Path) -> tuple[Path, Path]:
    """The tiny fixture in the official formats, and the same weights dequantised (dense)."""
    state = load_state_dict(src)
    official, dense = {}, {}
    for name, t in state.items():
        key = name.removeprefix("model.")
        if ".experts." in key and key.endswith(".weight") and "shared" not in key:
            blocks, scales = quantize_mxfp4(t)
            official[key], official[key.replace(".weight", ".scale")] = mxfp4_to_fp4(blocks, scales)
            dense[name] = dequantize_mxfp4(blocks, scales)
        elif key.endswith(FP8_NAMES):
            q, s = quantize_fp8_blocks(t, BLOCK)
            official[key], official[key.replace(".weight", ".scale")] = q, s
            dense[name] = dequantize_fp8_blocks(q, s, BLOCK)
        else:
            official[key] = dense[name] = t
    cfg = json.loads((src / "config.json").read_text())
    paths = []
    for kind, tensors in (("official", official), ("dense", dense)):
        folder = out / kind
        folder.mkdir()
        extra = {"expert_dtype": "fp4"} if kind == "official" else {}
        quant = {"quant_method": "fp8", "scale_fmt": "ue8m0", "weight_block_size": [BLOCK] * 2}
        if kind == "official":
            extra["quantization_config"] = quant
        (folder / "config.json").write_text(json.dumps({**cfg, **extra}))
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors")
        )
        for f in src.glob("tokenizer*"):
            (folder / f.name).write_bytes(f.read_bytes())
        paths.append(folder)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def formats(tiny_v4_path, tmp_path_factory):
    return _official(Path(tiny_v4_path), tmp_path_factory.mktemp("formats"))


def test_fp4_experts_load_as_mxfp4_and_match_the_dequantised_model(formats):
    official, dense = formats
    fp4, cfg = load_model(official)
    ref, _ = load_model(dense)
    w1 = fp4.layers[1].ffn.experts["3"].w1
    assert isinstance(w1, MXFP4Linear) and w1.weight_blocks.dtype == torch.uint8
    assert fp4.layers[0].attn.wq_a.weight.dtype == torch.float32  # FP8 dequantised at load
    ids = torch.randint(0, 512, (45,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = fp4.compute_logits(fp4(ids, torch.arange(45), V4Context.fresh(fp4, [45])).hidden)
        want = ref.compute_logits(ref(ids, torch.arange(45), V4Context.fresh(ref, [45])).hidden)
    assert (got - want).abs().max().item() <= 1e-4


def test_official_format_serves_with_its_mtp_layer(formats):
    """The `mtp.0.*` layer in the official formats (FP4 experts, FP8 e_proj) loads from the
    target's folder; greedy NEXTN equals plain decoding."""
    official, _ = formats
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = []
    for algo in ("NONE", "NEXTN"):
        llm = LLM(str(official), max_total_tokens=1024, page_size=8)
        if algo == "NEXTN":
            spec = SpecConfig(algorithm=algo, draft_model_path=str(official), num_steps=2)
            llm.engine.set_speculation(*build_speculation(spec, llm.engine))
            layer = llm.engine.drafter.layer
            assert isinstance(layer.ffn.experts["0"].w1, MXFP4Linear)
        outs.append(llm.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids)
    assert outs[0] == outs[1]


def test_moe_runner_backend_mxfp4_quantises_the_experts(tiny_v4_path):
    """--moe-runner-backend mxfp4 on a dense checkpoint: each routed expert is MXFP4 and the
    model equals the dense one whose experts went through quantise + dequantise."""
    quant, _ = load_model(tiny_v4_path, moe_backend="mxfp4")
    ref, _ = load_model(tiny_v4_path)
    for layer in ref.layers:
        for expert in layer.ffn.experts.values():
            for proj in (expert.w1, expert.w2, expert.w3):
                proj.weight.data = dequantize_mxfp4(*quantize_mxfp4(proj.weight.data))
    assert isinstance(quant.layers[2].ffn.experts["5"].w2, MXFP4Linear)
    assert not isinstance(quant.layers[2].ffn.shared_experts.w2, MXFP4Linear)
    ids = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = quant.compute_logits(
            quant(ids, torch.arange(30), V4Context.fresh(quant, [30])).hidden
        )
        want = ref.compute_logits(ref(ids, torch.arange(30), V4Context.fresh(ref, [30])).hidden)
    assert (got - want).abs().max().item() <= 1e-4
    back, _ = load_model(tiny_v4_path, moe_backend="torch")  # dense stays dense
    assert not isinstance(back.layers[2].ffn.experts["5"].w2, MXFP4Linear)
