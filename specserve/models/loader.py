"""Load a Hugging Face checkpoint folder (config.json + *.safetensors) into our model classes."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from specserve.config import ConfigError, ModelConfig
from specserve.models.parallel import Parallel, shard_of
from specserve.models.qwen3 import CausalLM
from specserve.models.registry import model_class

_ReadError = (SafetensorError, OSError)


def load_state_dict(
    path: str | Path, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of the folder's *.safetensors files (only names `keep` accepts, if given)."""
    path = Path(path)
    keep = None if keep is None else _lenient(keep)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors weight files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:  # only reading is guarded: a failing `keep` is not a file problem
            with safe_open(str(f), framework="pt") as h:
                names = [k for k in h.keys() if keep is None or keep(k)]
                state.update({k: h.get_tensor(k) for k in names})
        except _ReadError as e:
            raise ConfigError(f"{f}: cannot read safetensors file ({e})") from None
    return state


def _lenient(keep: Callable[[str], bool]) -> Callable[[str], bool]:
    """`keep` that keeps a name it cannot place (say, an expert weight where config.json
    describes a dense layer), so the name check below reports it instead of a crash."""

    def check(name: str) -> bool:
        try:
            return keep(name)
        except (AttributeError, IndexError, KeyError, ValueError):
            return True

    return check


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    par: Parallel | None = None,
    moe_backend: str | None = None,
) -> tuple[CausalLM, ModelConfig]:
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
    problems = [f"lacks weights, e.g. {missing[:3]}"] if missing else []
    if unexpected:
        problems.append(f"has weights config.json does not describe, e.g. {unexpected[:3]}")
    if problems:
        raise ConfigError(f"{path}: checkpoint {'; '.join(problems)}")
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
