"""Drafter checkpoint folders: read and write them, and check that a drafter fits its target.

A folder holds `config.json` (the target's config plus the drafter's fields) and
`*.safetensors`. DFlash / DSpark folders use the DeepSpec layout (see `dflash.py`); DeepSeek-V4
style configs whose drafter keys carry a `dspark_` prefix (`dspark_block_size`,
`dspark_noise_token_id`, ...) are read too. MTP folders hold `enorm`, `hnorm`, `eh_proj` and
`layers.0.*` with `architectures: ["Qwen3MTPModel"]`. The embedding, LM head (and for MTP the
final norm) are the target's unless the folder carries its own.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from specserve.config import ConfigError, ModelConfig, read_config_json
from specserve.models.layers import RotaryEmbedding
from specserve.models.loader import load_state_dict
from specserve.speculative.dflash import DFlashDraftModel
from specserve.speculative.draft_config import DraftConfig
from specserve.speculative.dspark import DSparkDraftModel
from specserve.speculative.handle import TargetHandle
from specserve.speculative.mtp import MTPModule

DraftModel = DFlashDraftModel | MTPModule

#: the architecture name each drafter kind is saved under (DFlash: z-lab's name)
ARCHITECTURES = {"mtp": "Qwen3MTPModel", "dflash": "DFlashDraftModel", "dspark": "Qwen3DSparkModel"}

# DeepSeek-V4 style keys -> DeepSpec names
_ALIASES = {"noise_token_id": "mask_token_id", "num_layers": "num_hidden_layers"}
_WEIGHT_PREFIXES = ("dspark.", "model.dspark.", "drafter.", "model.")
_DRAFT_FIELDS = (
    "block_size",
    "target_layer_ids",
    "mask_token_id",
    "markov_rank",
    "markov_head_type",
    "enable_confidence_head",
    "confidence_head_with_markov",
    "num_target_layers",
)


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a drafter folder, `dspark_`-prefixed keys folded into DeepSpec names."""
    path = Path(path)
    raw = read_config_json(path, label="drafter ")
    prefixed = {k[len("dspark_") :]: v for k, v in raw.items() if k.startswith("dspark_")}
    if prefixed:
        prefixed = {_ALIASES.get(k, k): v for k, v in prefixed.items()}
        target_layers = raw.get("num_hidden_layers")
        raw = {**raw, **prefixed, "architectures": [ARCHITECTURES["dspark"]]}
        raw.setdefault("num_target_layers", target_layers)
        raw["num_hidden_layers"] = prefixed.get("num_hidden_layers", 1)
    return raw


def kind_of(raw: dict[str, Any]) -> str:
    """'mtp', 'dflash' or 'dspark' from the config's architecture."""
    arch = (raw.get("architectures") or [""])[0].lower()
    if "mtp" in arch or "nextn" in arch:
        return "mtp"
    if "dspark" in arch:
        return "dspark"
    if "dflash" in arch:
        return "dflash"
    raise ConfigError(
        f"drafter config: architecture {arch or None!r} is not a DSpark, DFlash or MTP drafter"
    )


def draft_config(raw: dict[str, Any]) -> DraftConfig:
    """DFlash / DSpark config dict -> DraftConfig (missing required fields named)."""
    for name in ("block_size", "target_layer_ids", "mask_token_id", "num_hidden_layers"):
        if name not in raw:
            raise ConfigError(f"drafter config.json is missing required field {name!r}")
    own = {k: raw[k] for k in _DRAFT_FIELDS if k in raw}
    if "num_target_layers" not in own:
        raise ConfigError("drafter config.json is missing required field 'num_target_layers'")
    base = {k: v for k, v in raw.items() if k not in _DRAFT_FIELDS}
    arch = raw["architectures"][0]
    return DraftConfig.from_target(
        {**base, "num_hidden_layers": own.pop("num_target_layers")},
        int(raw["num_hidden_layers"]),
        architecture=arch,
        **{
            k: (int(v) if k in ("block_size", "mask_token_id", "markov_rank") else v)
            for k, v in own.items()
        },
    )


def check_fits(raw: dict[str, Any], target: ModelConfig) -> None:
    """Refuse a drafter whose vocab_size, hidden_size or target_layer_ids do not fit the target."""
    for name in ("vocab_size", "hidden_size"):
        mine, theirs = raw.get(name), getattr(target, name)
        if mine != theirs:
            raise ConfigError(
                f"drafter does not fit the target: {name} is {mine}, the target's is {theirs}"
            )
    if kind_of(raw) == "mtp":
        return
    n = target.num_hidden_layers
    ids = raw.get("target_layer_ids") or []
    if any(not (i == -1 or 0 <= int(i) < n) for i in ids):
        raise ConfigError(
            f"drafter does not fit the target: target_layer_ids {list(ids)} are not all in "
            f"{{-1}} U [0, {n - 1}] (the target has {n} layers)"
        )
    declared = raw.get("num_target_layers")
    if declared is not None and int(declared) != n:
        raise ConfigError(
            f"drafter does not fit the target: num_target_layers is {declared}, the target has "
            f"{n} layers"
        )


def build_model(raw: dict[str, Any], target_raw: dict[str, Any]) -> DraftModel:
    """An uninitialised drafter module for the config."""
    kind = kind_of(raw)
    if kind == "mtp":
        arch = target_raw.get("architectures")  # the target's, so qk_norm matches it
        mtp = ModelConfig.from_dict({**target_raw, **raw, "architectures": arch})
        return MTPModule(replace(mtp, num_hidden_layers=1))
    cfg = draft_config(raw)
    return DSparkDraftModel(cfg) if kind == "dspark" else DFlashDraftModel(cfg)


def load_drafter(
    path: str | Path,
    target: TargetHandle,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> DraftModel:
    """Load a drafter folder against its target (the target's config checked first)."""
    path = Path(path)
    raw = read_config(path)
    check_fits(raw, target.config)
    model = build_model(raw, target.config.raw)
    state = _strip_prefix(load_state_dict(path), model)
    expected = model.state_dict()
    own_shared = [s for s in model.SHARED if any(k.startswith(s + ".") for k in state)]
    needed = {
        k for k in expected if k.split(".")[0] not in model.SHARED or k.split(".")[0] in own_shared
    }
    missing = sorted(needed - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing:
        raise ConfigError(f"drafter {path}: checkpoint lacks weights, e.g. {missing[:3]}")
    if unexpected:
        raise ConfigError(f"drafter {path}: checkpoint has unknown weights, e.g. {unexpected[:3]}")
    for name in needed:
        if expected[name].shape != state[name].shape:
            raise ConfigError(
                f"drafter {path}: {name} has shape {tuple(state[name].shape)}, config implies "
                f"{tuple(expected[name].shape)}"
            )
    model.load_state_dict({k: state[k] for k in needed}, strict=False)
    model = model.to(device=device, dtype=dtype)
    m = model.config if isinstance(model, MTPModule) else model.config.model
    model.rotary = RotaryEmbedding(  # cos/sin tables stay float32, as the target's
        m.head_dim, m.max_position_embeddings, m.rope_theta, m.rope_scaling
    ).to(device)
    model.share_target(target, tuple(s for s in model.SHARED if s not in own_shared))
    model.eval().requires_grad_(False)
    return model


def save_drafter(model: DraftModel, path: str | Path, include_shared: bool = False) -> Path:
    """Write config.json + model.safetensors (shared target weights left out by default)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(model, MTPModule):
        cfg = {
            **model.config.raw,
            "architectures": [ARCHITECTURES["mtp"]],
            "num_target_layers": model.config.raw.get(
                "num_target_layers", model.config.raw.get("num_hidden_layers")
            ),
            "num_hidden_layers": 1,
        }
    else:
        cfg = model.config.to_dict()
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if include_shared or k.split(".")[0] not in model.SHARED
    }
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def _strip_prefix(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Drop a container prefix (`dspark.`, `model.`, ...) when the names carry one."""
    names = model.state_dict().keys()
    if any(k in names for k in state):
        return state
    for p in _WEIGHT_PREFIXES:
        stripped = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
        if stripped and any(k in names for k in stripped):
            return stripped
    return state


def new_drafter(
    target: dict[str, Any],
    kind: str,
    num_hidden_layers: int = 1,
    seed: int | None = 0,
    **fields: Any,
) -> DraftModel:
    """A freshly initialised drafter for the target config dict (training start, tests); share
    the target's parts with `share_target` before use.

    kind: 'mtp' | 'dflash' | 'dspark'; fields: DraftConfig fields (block_size, target_layer_ids,
    mask_token_id, markov_rank, ...), unused for 'mtp'. seed None: keep torch's RNG as it is."""
    if seed is not None:
        torch.manual_seed(seed)
    arch = ARCHITECTURES[kind]
    if kind == "mtp":
        return build_model({**target, "architectures": [arch]}, target)
    cfg = DraftConfig.from_target(target, num_hidden_layers, architecture=arch, **fields)
    return DSparkDraftModel(cfg) if kind == "dspark" else DFlashDraftModel(cfg)
