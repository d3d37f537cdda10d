"""Hugging Face architecture name -> model class."""

from __future__ import annotations

from torch import nn

from specserve.models.deepseek_v4 import DeepseekV4ForCausalLM
from specserve.models.qwen3 import LlamaForCausalLM, Qwen3ForCausalLM
from specserve.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV4ForCausalLM": DeepseekV4ForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(
            f"architecture {architecture!r} is not supported (supported: {supported})"
        ) from None
