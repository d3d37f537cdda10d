"""Load a Hugging Face checkpoint folder (config.json + *.safetensors) into our model classes."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from specserve.config import ConfigError, ModelConfig
from specserve.models.parallel import Parallel, shard_of
from specserve.models.registry import model_class


def load_state_dict(
    path: str | Path, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of the folder's *.safetensors files (only names `keep` accepts, if given)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors weight files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if keep is None:
                state.update(load_file(str(f)))
                continue
            with safe_open(str(f), framework="pt") as h:
                state.update({k: h.get_tensor(k) for k in h.keys() if keep(k)})
        except Exception as e:  # safetensors raises its own error types
            raise ConfigError(f"{f}: cannot read safetensors file ({e})") from None
    return state


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    par: Parallel | None = None,
    moe_backend: str | None = None,
) -> tuple[nn.Module, ModelConfig]:
    """Build the registered class for the folder's architecture and load its weights.

    `par`: build and load only this rank's shard. `moe_backend` (torch | mxfp4): the expert
    weight format to serve, converting on load if the checkpoint's differs (None: as stored)."""
    cfg = ModelConfig.from_pretrained(path)
    try:
        cls = model_class(cfg.architecture)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    with torch.device("meta"):
        model = cls(cfg) if par is None else cls(cfg, par)
    model = model.to_empty(device=device)
    state = load_state_dict(path, getattr(model, "holds_weight", None))
    convert = getattr(model, "convert_checkpoint", None)  # the model's own names / formats
    if convert is not None:
        state = convert(state)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    targets = model.state_dict(keep_vars=True)  # parameters and (MXFP4) buffers
    expected = {k for k in targets if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - state.keys())
    unexpected = sorted(k for k in state.keys() - expected if "rotary_emb" not in k)
    if missing:
        raise ConfigError(f"{path}: checkpoint lacks weights, e.g. {missing[:3]}")
    if unexpected:
        raise ConfigError(f"{path}: checkpoint has unknown weights, e.g. {unexpected[:3]}")
    for name, tensor in state.items():
        if name in expected:
            param, tensor = targets[name], shard_of(model, name, tensor)
            if param.shape != tensor.shape:
                raise ConfigError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, config implies "
                    f"{tuple(param.shape)}"
                )
            param.data.copy_(tensor)
    if cfg.tie_word_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
    if moe_backend is not None:
        from specserve.models.qwen3_moe import set_moe_backend

        getattr(model, "set_moe_backend", partial(set_moe_backend, model))(moe_backend)
    keep = getattr(model, "float32_params", ())  # names (suffixes) kept in float32, as HF does
    saved = {n: p.data for n, p in model.named_parameters() if keep and n.endswith(keep)}
    model = model.to(dtype=dtype).eval()
    for name, data in saved.items():
        model.get_parameter(name).data = data
    # Buffers (rotary tables) were created on meta: rebuild them, in float32, on the device.
    if hasattr(model, "init_buffers"):
        model.init_buffers(device)
    else:
        model.model.rotary.__init__(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        model.model.rotary.to(device)
    model.requires_grad_(False)
    return model, cfg
