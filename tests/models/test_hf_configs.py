"""Checkpoints written by the pinned transformers' own `save_pretrained` load and match its logits.

transformers 5 writes `rope_parameters` instead of `rope_theta` / `rope_scaling` and Qwen3-MoE's
`num_local_experts` instead of `num_experts`; these configs use every such spelling.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from specserve.config import ConfigError, ModelConfig
from specserve.models.attention import CausalAttention
from specserve.models.loader import load_model

_SHAPE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)

CASES = {
    "qwen3": (
        transformers.Qwen3Config,
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    ),
    "llama3-rope": (
        transformers.LlamaConfig,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            "attention_bias": True,
        },
    ),
    "llama-linear-rope": (
        transformers.LlamaConfig,
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
    ),
    "qwen3-moe": (
        transformers.Qwen3MoeConfig,
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "norm_topk_prob": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 2e4},
        },
    ),
}


def _save(tmp_path, case: str) -> tuple[str, torch.nn.Module]:
    cls, extra = CASES[case]
    config = cls(**_SHAPE, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the default init, so the logits differ a lot
        for p in model.parameters():
            p.normal_(0.0, 0.1) if p.dim() > 1 else None
    model.save_pretrained(tmp_path / case)
    return str(tmp_path / case), model


@pytest.mark.parametrize("case", list(CASES))
def test_saved_by_transformers_loads_and_matches(tmp_path, case):
    path, ref = _save(tmp_path, case)
    written = json.loads((tmp_path / case / "config.json").read_text())
    assert "rope_parameters" in written and "rope_theta" not in written
    ours, cfg = load_model(path)
    assert cfg.rope_theta == CASES[case][1]["rope_parameters"]["rope_theta"]
    if case == "qwen3-moe":
        assert "num_local_experts" in written and "num_experts" not in written
        assert cfg.num_experts == 4
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        out = ours(ids.reshape(-1), torch.arange(40).repeat(2), CausalAttention(2, 40))
        got = ours.compute_logits(out.hidden).view(2, 40, -1)
    assert want.abs().max() > 0.1  # not two near-zero tensors
    assert (got - want).abs().max().item() <= 1e-4


def test_moe_config_that_does_not_fit_is_not_a_file_error(tmp_path):
    path, _ = _save(tmp_path, "qwen3-moe")
    cfg_file = tmp_path / "qwen3-moe" / "config.json"
    raw = json.loads(cfg_file.read_text())
    del raw["num_local_experts"]  # now it reads as a dense model
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        load_model(path)
    assert "cannot read" not in str(err.value)
    assert "does not describe" in str(err.value) and "experts" in str(err.value)


@pytest.mark.parametrize(
    "extra, needle",
    [
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
        ({"num_hidden_layers": "two"}, "wrong type"),
    ],
)
def test_unsupported_config_is_a_clear_error(extra, needle):
    raw = {"architectures": ["Qwen3ForCausalLM"], **_SHAPE, **extra}
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_dict(raw)
