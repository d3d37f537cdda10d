"""The MXFP4 checkpoint converter on a tiny fake Qwen3-MoE checkpoint, and its CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from specserve.cli import main
from specserve.quant.convert import ConversionError, convert_checkpoint, load_mxfp4_state
from specserve.quant.mxfp4 import MXFP4Weight, dequantize_mxfp4, quantize_mxfp4

HIDDEN, INTER, EXPERTS, LAYERS, VOCAB = 64, 32, 4, 2, 50


def fake_qwen3_moe_tensors(hidden: int = HIDDEN) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rand(VOCAB, hidden), "lm_head.weight": rand(VOCAB, hidden)}
    t["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"{p}.self_attn.{name}.weight"] = rand(hidden, hidden)
        t[f"{p}.self_attn.q_norm.weight"] = rand(16)
        t[f"{p}.input_layernorm.weight"] = rand(hidden)
        t[f"{p}.mlp.gate.weight"] = rand(EXPERTS, hidden)
        for e in range(EXPERTS):
            t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = rand(INTER, hidden)
            t[f"{p}.mlp.experts.{e}.up_proj.weight"] = rand(INTER, hidden)
            t[f"{p}.mlp.experts.{e}.down_proj.weight"] = rand(hidden, INTER)
    return t


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Two shards (layer 0 + embeddings / the rest) with an index, as HF writes them."""
    path.mkdir()
    config = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": HIDDEN, "num_experts": 4}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (path / "generation_config.json").write_text('{"do_sample": true}')
    first = {n: v for n, v in tensors.items() if n.startswith(("model.layers.0.", "model.embed"))}
    rest = {n: v for n, v in tensors.items() if n not in first}
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": rest}
    for file, part in files.items():
        save_file(part, path / file, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
        "weight_map": {n: f for f, part in files.items() for n in part},
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def load_all(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = fake_qwen3_moe_tensors()
    return write_checkpoint(tmp_path / "model", tensors), tensors


def test_round_trip(checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, original = checkpoint
    report = convert_checkpoint(src, tmp_path / "out")
    out = tmp_path / "out"
    experts = [n for n in original if ".mlp.experts." in n]
    assert report.expert_weights == len(experts) == LAYERS * EXPERTS * 3
    assert report.expert_bytes_after * 8 / sum(original[n].numel() for n in experts) == 4.25

    state = load_all(out)
    for name, tensor in original.items():
        if name in experts:
            assert name not in state
            blocks, scales = state[name + "_blocks"], state[name + "_scales"]
            rows, k = tensor.shape
            assert blocks.dtype == scales.dtype == torch.uint8
            assert blocks.shape == (rows, k // 32, 16) and scales.shape == (rows, k // 32)
            expected = dequantize_mxfp4(*quantize_mxfp4(tensor.float()))
            assert torch.equal(dequantize_mxfp4(blocks, scales), expected)
        else:
            assert state[name].dtype == tensor.dtype
            assert raw_bytes(state[name]) == raw_bytes(tensor)
    assert len(state) == len(original) + len(experts)

    for file in ("tokenizer.json", "generation_config.json"):
        assert (out / file).read_bytes() == (src / file).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config.pop("quantization_config") == {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "lm_head",
            "model.embed_tokens",
            "model.layers.*.mlp.gate",
            "model.layers.*.self_attn.k_proj",
            "model.layers.*.self_attn.o_proj",
            "model.layers.*.self_attn.q_proj",
            "model.layers.*.self_attn.v_proj",
        ],
    }
    assert config == json.loads((src / "config.json").read_text())

    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert index["weight_map"].pop(name) == shard.name
    assert index["weight_map"] == {}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())


def test_load_mxfp4_state(checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, original = checkpoint
    convert_checkpoint(src, tmp_path / "out")
    state = load_all(tmp_path / "out")
    weights = load_mxfp4_state(state)
    assert sorted(weights) == sorted(n for n in original if ".mlp.experts." in n)
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    w = weights[name]
    assert isinstance(w, MXFP4Weight) and w.shape == original[name].shape
    x = torch.randn(3, INTER)
    torch.testing.assert_close(w.linear(x), x @ w.dequantize().T)
    # The dequantised expert is the original up to MXFP4 error (~11.5% relative RMS).
    rel = (w.dequantize() - original[name].float()).norm() / original[name].float().norm()
    assert 0.05 < rel < 0.2

    without_scales = {n: t for n, t in state.items() if n != name + "_scales"}
    with pytest.raises(ValueError, match=f"{name}_blocks has no matching {name}_scales"):
        load_mxfp4_state(without_scales)
    without_blocks = {n: t for n, t in state.items() if n != name + "_blocks"}
    with pytest.raises(ValueError, match=f"{name}_scales has no matching {name}_blocks"):
        load_mxfp4_state(without_blocks)


def test_errors(checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, _ = checkpoint
    with pytest.raises(ConversionError, match="model folder not found"):
        convert_checkpoint(tmp_path / "missing", tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert_checkpoint(tmp_path / "empty", tmp_path / "o2")
    with pytest.raises(ConversionError, match="must differ"):
        convert_checkpoint(src, src)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConversionError, match="not empty"):
        convert_checkpoint(src, tmp_path / "full")

    dense = write_checkpoint(
        tmp_path / "dense", {"model.layers.0.mlp.up_proj.weight": torch.zeros(32, 64)}
    )
    with pytest.raises(ConversionError, match="no MoE expert weights"):
        convert_checkpoint(dense, tmp_path / "o3")

    odd = write_checkpoint(tmp_path / "odd", fake_qwen3_moe_tensors(hidden=48))
    with pytest.raises(
        ConversionError, match=r"gate_proj.weight has shape \[32, 48\].*multiple of 32"
    ):
        convert_checkpoint(odd, tmp_path / "o4")
    assert not (tmp_path / "o4").exists()  # checked before anything is written

    convert_checkpoint(src, tmp_path / "o5")
    with pytest.raises(ConversionError, match="already has a quantization_config"):
        convert_checkpoint(tmp_path / "o5", tmp_path / "o6")


def test_cli(checkpoint: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, capsys) -> None:
    src, _ = checkpoint
    assert main(["quantize", "mxfp4", "--model-path", str(src), "--out", str(tmp_path / "o")]) == 0
    assert "converted 24 expert weights to MXFP4" in capsys.readouterr().out
    assert (tmp_path / "o" / "config.json").is_file()

    missing = tmp_path / "nope"
    assert (
        main(["quantize", "mxfp4", "--model-path", str(missing), "--out", str(tmp_path / "p")]) == 2
    )
    assert (
        capsys.readouterr().err == f"specserve quantize: error: model folder not found: {missing}\n"
    )


def test_cli_module_imports_nothing_heavy() -> None:
    code = "import sys, specserve.quant.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
