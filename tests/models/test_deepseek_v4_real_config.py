"""The real DeepSeek-V4-Flash config, built on the `meta` device (no weights).

`data/deepseek_v4_flash/config.json` is the published `config.json` of deepseek-ai/
DeepSeek-V4-Flash as quoted verbatim in the tests of public repositories (two independent quotes
agree field for field); it was not downloaded from the Hugging Face hub here.

Published figures checked against: 284B total parameters and 13B activated (the model card);
6.72 GiB of bf16 KV cache at a 1M-token context (the per-layer breakdown of vLLM's DeepSeek-V4
blog, as tabulated in "The exact KV cache usage of DeepSeek V4", r/LocalLLaMA).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specserve.config import ConfigError, ModelConfig
from specserve.engine.model_runner import kv_bytes_per_token
from specserve.models.deepseek_v4 import DeepseekV4ForCausalLM
from specserve.models.deepseek_v4_config import CSA, HCA, SLIDING
from specserve.models.parallel import ParallelConfig

FLASH = Path(__file__).parent / "data" / "deepseek_v4_flash"


@pytest.fixture(scope="module")
def flash():
    cfg = ModelConfig.from_pretrained(FLASH)
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(cfg)
    return cfg, model


def test_layout_read_from_the_legacy_keys(flash):
    _, model = flash
    v4 = model.v4
    assert v4.layer_types[:4] == (SLIDING, SLIDING, CSA, HCA)
    assert v4.layer_types[-1] == CSA and len(v4.layer_types) == 43  # the 44th ratio is MTP's
    assert v4.hash_layers[:4] == (True, True, True, False)
    assert v4.rope_dim == 64 and v4.compress_rope["rope_type"] == "yarn"
    assert v4.compress_rope["attention_factor"] == 1.0


def _weights(module) -> int:
    """Parameters, counting the FP4 experts' packed bytes as two weights each."""
    packed = sum(b.numel() * 2 for n, b in module.named_buffers() if n.endswith("weight_blocks"))
    return sum(p.numel() for p in module.parameters()) + packed


def test_parameter_count_matches_the_published_figures(flash):
    _, model = flash
    assert model.v4.fp4_experts  # expert_dtype fp4: experts are built as MXFP4
    total = _weights(model)
    assert abs(total - 284e9) / 284e9 < 0.005
    v4 = model.v4
    expert = _weights(model.layers[3].ffn.experts["0"])
    routed = sum(_weights(layer.ffn.experts) for layer in model.layers)
    embed_and_head = model.embed.weight.numel() + model.head.weight.numel()
    active = total - routed + v4.num_layers * v4.top_k * expert - embed_and_head
    assert abs(active - 13e9) / 13e9 < 0.05


def test_cache_bytes_per_token_match_the_published_figure(flash):
    cfg, _ = flash
    per_token = kv_bytes_per_token(cfg, torch.bfloat16)
    assert round(per_token * 2**20 / 2**30, 2) == 6.72  # GiB at 1M tokens
    # the window and unfinished compression windows: a bounded amount per request
    assert DeepseekV4ForCausalLM.cache_bytes_per_request(cfg, torch.bfloat16) < 16 * 2**20


def test_tp8_ep8_split_is_accepted_and_bad_splits_are_named(flash):
    cfg, _ = flash
    ParallelConfig(tp_size=8, ep_size=8).check_model(cfg, mxfp4=True)
    with pytest.raises(ConfigError, match="--tp-size 3 does not divide"):
        ParallelConfig(tp_size=3, ep_size=3).check_model(cfg)
    with pytest.raises(ConfigError, match="o_groups"):
        ParallelConfig(tp_size=16, ep_size=16).check_model(cfg)
