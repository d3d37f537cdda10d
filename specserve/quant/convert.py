"""Convert a Hugging Face MoE checkpoint's expert weights to MXFP4, and load them back.

Input: a folder with config.json, *.safetensors (optionally sharded with a
`*.safetensors.index.json`) and tokenizer / generation files.

Naming. Every expert weight (Qwen3-MoE layout)

    <prefix>.mlp.experts.<e>.<gate|up|down>_proj.weight     [out, K], bf16/fp16/fp32

becomes two uint8 tensors in the same shard, one pair per expert:

    <prefix>.mlp.experts.<e>.<proj>.weight_blocks           [out, K // 32, 16]
    <prefix>.mlp.experts.<e>.<proj>.weight_scales           [out, K // 32]

with the byte layout of `specserve.quant.mxfp4` (that of gpt-oss). K, the input dim,
must be a multiple of 32. Every other tensor is written back bit-identical with its
dtype, every other file is copied unchanged, the shard index's weight_map and
total_size are rewritten, and config.json gains

    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [...]}

where modules_to_not_convert lists the other 2-D `.weight` modules (attention
projections, router, embeddings, lm_head) with layer indices written as `*`, as in
gpt-oss's config.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from specserve.quant.mxfp4 import BLOCK_SIZE, MXFP4Weight

EXPERT_WEIGHT = re.compile(r".+\.mlp\.experts\.\d+\.(?:gate|up|down)_proj\.weight")
BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
QUANT_METHOD = "mxfp4"


class ConversionError(Exception):
    """The checkpoint cannot be converted; the message says why, for the user."""


@dataclass(frozen=True)
class ConversionReport:
    """What `convert_checkpoint` did; byte counts are for tensor data only."""

    expert_weights: int
    expert_bytes_before: int
    expert_bytes_after: int
    out_dir: Path


def is_expert_weight(name: str) -> bool:
    return EXPERT_WEIGHT.fullmatch(name) is not None


def blocks_name(weight_name: str) -> str:
    return weight_name + BLOCKS_SUFFIX


def scales_name(weight_name: str) -> str:
    return weight_name + SCALES_SUFFIX


def convert_checkpoint(model_path: Path | str, out_dir: Path | str) -> ConversionReport:
    """Write an MXFP4 copy of the checkpoint at `model_path` into `out_dir` (new or empty)."""
    src, dst = Path(model_path), Path(out_dir)
    shards = _check_source(src)
    expert_names = _find_expert_weights(shards)
    _check_destination(src, dst)
    dst.mkdir(parents=True, exist_ok=True)

    before = after = written = 0
    renamed: dict[str, list[str]] = {}
    other_modules: set[str] = set()
    for shard in shards:
        tensors, metadata = _read_shard(shard)
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if name in expert_names:
                w = MXFP4Weight.from_dense(t)
                out[blocks_name(name)], out[scales_name(name)] = w.blocks, w.scales
                renamed[name] = [blocks_name(name), scales_name(name)]
                before, after = before + t.nbytes, after + w.nbytes
            else:
                out[name] = t
                if name.endswith(".weight") and t.ndim == 2:
                    other_modules.add(_module_pattern(name))
        save_file(out, dst / shard.name, metadata=metadata)
        written += sum(t.nbytes for t in out.values())

    for item in src.iterdir():
        if item.suffix != ".safetensors" and item.name != "config.json":
            _copy(item, dst / item.name)
    _rewrite_index(dst, renamed, written)
    _write_config(src, dst, sorted(other_modules))
    return ConversionReport(len(renamed), before, after, dst)


def load_mxfp4_state(state: Mapping[str, torch.Tensor]) -> dict[str, MXFP4Weight]:
    """MXFP4Weight per quantised weight in `state`, keyed by the original name (`...weight`).

    `state` is a loaded state dict of a converted checkpoint (all shards merged); tensors
    stay on their device. Unpaired `_blocks` / `_scales` tensors are an error.
    """
    weights: dict[str, MXFP4Weight] = {}
    for name, blocks in state.items():
        if not name.endswith(BLOCKS_SUFFIX):
            continue
        base = name[: -len(BLOCKS_SUFFIX)]
        if scales_name(base) not in state:
            raise ValueError(f"{name} has no matching {scales_name(base)}")
        weights[base] = MXFP4Weight(blocks, state[scales_name(base)])
    for name in state:
        base = name.removesuffix(SCALES_SUFFIX)
        if base != name and base not in weights:
            raise ValueError(f"{name} has no matching {blocks_name(base)}")
    return weights


def _check_source(src: Path) -> list[Path]:
    if not src.is_dir():
        raise ConversionError(f"model folder not found: {src}")
    config = src / "config.json"
    if not config.is_file():
        raise ConversionError(f"no config.json in {src}")
    if "quantization_config" in json.loads(config.read_text()):
        raise ConversionError(f"{config} already has a quantization_config")
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise ConversionError(f"no *.safetensors files in {src}")
    return shards


def _find_expert_weights(shards: list[Path]) -> dict[str, list[int]]:
    """Expert weight name -> shape, from the shard headers; checks every K before any work."""
    shapes: dict[str, list[int]] = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                if is_expert_weight(name):
                    shapes[name] = f.get_slice(name).get_shape()
    if not shapes:
        raise ConversionError(
            "no MoE expert weights found (expected names like "
            "model.layers.0.mlp.experts.0.gate_proj.weight)"
        )
    for name, shape in shapes.items():
        if len(shape) != 2 or shape[1] % BLOCK_SIZE:
            raise ConversionError(
                f"{name} has shape {shape}; MXFP4 needs [out, in] with in a multiple of {BLOCK_SIZE}"
            )
    return shapes


def _check_destination(src: Path, dst: Path) -> None:
    if dst.resolve() == src.resolve():
        raise ConversionError("--out must differ from --model-path")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"output folder {dst} exists and is not empty")


def _read_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


def _module_pattern(weight_name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'model.layers.*.self_attn.q_proj'."""
    return re.sub(r"\.layers\.\d+\.", ".layers.*.", weight_name.removesuffix(".weight"))


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def _rewrite_index(dst: Path, renamed: dict[str, list[str]], total_size: int) -> None:
    """Point each expert weight's index entry at its blocks/scales pair; set total_size."""
    for index_path in dst.glob("*.safetensors.index.json"):
        index = json.loads(index_path.read_text())
        weight_map: dict[str, str] = {}
        for name, file in index.get("weight_map", {}).items():
            for new_name in renamed.get(name, [name]):
                weight_map[new_name] = file
        index["weight_map"] = weight_map
        index.setdefault("metadata", {})["total_size"] = total_size
        index_path.write_text(json.dumps(index, indent=2) + "\n")


def _write_config(src: Path, dst: Path, modules_to_not_convert: list[str]) -> None:
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "modules_to_not_convert": modules_to_not_convert,
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
