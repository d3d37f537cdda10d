"""Write small random checkpoints in Hugging Face format (config, safetensors, tokenizer).

Tests, benchmarks and examples use these instead of downloading anything. The tokenizer is a
byte-level BPE trained on text that ships with Python, so it is deterministic and offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from specserve.train.tokenizer import save_tokenizer

# Defaults for `model_type="qwen3_moe"`: 8 experts, top 2; sizes are multiples of 64 so that
# MXFP4 (blocks of 32) works with experts split over two ranks.
TINY_MOE: dict[str, Any] = {
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": 2,  # <|im_end|>
    }
    cfg.update(overrides)
    if cfg.get("model_type") == "llama":
        cfg["architectures"] = ["LlamaForCausalLM"]
    if cfg.get("model_type") == "qwen3_moe":
        cfg["architectures"] = ["Qwen3MoeForCausalLM"]
        for key, value in TINY_MOE.items():
            cfg.setdefault(key, value)
    return cfg


def make_checkpoint(
    out: str | Path,
    seed: int = 0,
    init_std: float = 0.02,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Path:
    """A random model of our own classes, saved like a Hugging Face checkpoint, its tensors in
    `dtype` (`torch_dtype` in config.json says which)."""
    from specserve.config import ModelConfig
    from specserve.models.registry import model_class

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(**overrides)
    mc = ModelConfig.from_dict(cfg)
    gen = torch.Generator().manual_seed(seed)
    model = model_class(mc.architecture)(mc)
    state = {}
    for name, p in model.state_dict().items():
        if cfg["tie_word_embeddings"] and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("bias"):
            state[name] = 0.02 * torch.randn(p.shape, generator=gen)
        else:
            state[name] = init_std * torch.randn(p.shape, generator=gen)
    save_file(
        {k: v.to(dtype).contiguous() for k, v in state.items()}, str(out / "model.safetensors")
    )
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_tokenizer(out, cfg["vocab_size"])
    return out


TINY_DEEPSEEK_V4: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 128,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "q_lora_rank": 64,
    "partial_rotary_factor": 0.25,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5,
    "layer_types": [
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ],
    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"],
    "sliding_window": 16,
    "o_groups": 2,
    "o_lora_rank": 32,
    "index_n_heads": 8,
    "index_head_dim": 32,
    "index_topk": 4,
    "hc_mult": 2,
    "rope_parameters": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    "max_position_embeddings": 1024,
    "eos_token_id": 2,  # <|im_end|>
}


#: the DSpark drafter keys `make_deepseek_v4_checkpoint(dspark=True)` adds to config.json (three
#: stages reading the last three layers, as DeepSeek-V4-Flash-DSpark's [40, 41, 42] of 43)
TINY_V4_DSPARK: dict[str, Any] = {
    "dspark_block_size": 4,
    "dspark_target_layer_ids": [1, 2, 3],
    "dspark_noise_token_id": 511,
    "dspark_markov_rank": 16,
}


def make_deepseek_v4_checkpoint(
    out: str | Path, seed: int = 0, mtp: bool = True, dspark: bool = False, **overrides: Any
) -> Path:
    """The issue-16 tiny DeepSeek-V4, built with `transformers` and saved by `save_pretrained`:
    random fp32 weights with the hash table, sinks, compressor position biases, router biases and
    hyper-connection biases randomised too (left at their zero init they hide bugs). `mtp`: add
    a random `mtp.0.*` layer (which transformers neither builds nor saves) in `mtp.safetensors`.
    `dspark`: instead, a random DSpark drafter as DeepSeek-V4-Flash-DSpark ships it (`dspark_*`
    config keys, `TINY_V4_DSPARK`; stages `mtp.{i}.*` in `dspark.safetensors`)."""
    if mtp and dspark:
        raise ValueError("the MTP layer and the DSpark stages both use mtp.* names; pick one")
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    cfg = DeepseekV4Config(**{**TINY_DEEPSEEK_V4, **overrides})
    model = DeepseekV4ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith("tid2eid"):
                t.copy_(torch.randint(0, cfg.n_routed_experts, t.shape, generator=gen))
            elif name.endswith(("sinks", "position_bias", "e_score_correction_bias")):
                t.copy_(torch.randn(t.shape, generator=gen))
            elif name.endswith(("attn_hc.base", "ffn_hc.base", "hc_head.hc_base")):
                t.copy_(0.5 * torch.randn(t.shape, generator=gen))
    model.save_pretrained(out)
    save_tokenizer(out, cfg.vocab_size)
    if mtp:
        _save_random_mtp(out, gen)
    if dspark:
        _save_random_dspark(out, gen)
    return out


def _save_random_mtp(out: Path, gen: torch.Generator) -> None:
    from specserve.config import ModelConfig
    from specserve.models.deepseek_v4_config import V4Config
    from specserve.speculative.deepseek_v4_mtp import PREFIX, MTPLayer

    layer = MTPLayer(V4Config.from_model_config(ModelConfig.from_pretrained(out)))
    state = {PREFIX + n: _random_like(n, p, gen) for n, p in layer.state_dict().items()}
    save_file(state, str(out / "mtp.safetensors"))


def _save_random_dspark(out: Path, gen: torch.Generator) -> None:
    from specserve.config import ModelConfig
    from specserve.models.deepseek_v4 import DeepseekV4ForCausalLM
    from specserve.speculative.deepseek_v4_dspark import DeepseekV4DSparkModel, V4DSparkConfig

    path = out / "config.json"
    raw = {**json.loads(path.read_text()), **TINY_V4_DSPARK}
    path.write_text(json.dumps(raw, indent=2))
    with torch.device("meta"):
        target = DeepseekV4ForCausalLM(ModelConfig.from_pretrained(out))
    model = DeepseekV4DSparkModel(target.v4, V4DSparkConfig.from_raw(raw, str(out)), target)
    state = {
        model.checkpoint_name(n): _random_like(n, p, gen) for n, p in model.state_dict().items()
    }
    save_file(state, str(out / "dspark.safetensors"))


def _random_like(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        t = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
    elif name.endswith(("scale", "gate.bias", "attn_sink")):
        t = 1.0 + 0.5 * torch.randn(p.shape, generator=gen)
    else:
        t = 0.05 * torch.randn(p.shape, generator=gen)
    return t.contiguous()
