"""Frozen configuration dataclasses, validated once and passed down.

`ModelConfig` mirrors the fields of a Hugging Face `config.json` that the model code needs;
the others configure the engine parts named after them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# `--kv-cache-dtype` (SGLang's and vLLM's flag): a 16-bit cache under a float32 model halves
# the bytes attention reads and the memory a token takes; keys and values are rounded once, as
# they are written, and every sum stays float32.
KV_CACHE_DTYPES: dict[str, torch.dtype] = DTYPES | {"bf16": torch.bfloat16, "fp16": torch.float16}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field."""


def read_config_json(folder: str | Path, label: str = "") -> dict[str, Any]:
    """A checkpoint folder's config.json; one clear error for a missing or corrupt file."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise ConfigError(f"{label}{folder}: no config.json (is this a Hugging Face folder?)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{label}{file}: not valid JSON ({e})") from None


ROPE_TYPES = (None, "default", "linear", "llama3")


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling): transformers 5 writes `rope_parameters` ({rope_theta, rope_type, ...});
    earlier versions `rope_theta` and `rope_scaling`."""
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    return theta, scaling


# Architectures whose model code reads its own attention layout and RoPE (DeepSeek-V4: window,
# CSA and HCA layers, YaRN on the compressed ones), so the checks below are not theirs.
OWN_ATTENTION = frozenset({"DeepseekV4ForCausalLM"})


def _check_full_attention(cfg: dict[str, Any]) -> None:
    """Sliding-window layers are not implemented (except in the `OWN_ATTENTION` models): refuse
    them rather than attend too far."""
    if (cfg.get("architectures") or [None])[0] in OWN_ATTENTION:
        return
    if cfg.get("use_sliding_window"):
        raise ConfigError(
            "config.json: use_sliding_window (sliding-window attention) is not supported"
        )
    other = {t for t in cfg.get("layer_types") or () if t != "full_attention"}
    if other:
        raise ConfigError(f"config.json: layer_types {sorted(other)} are not supported")


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    """The first of `names` that config.json sets (spellings differ between versions)."""
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # Mixture of experts (Qwen3-MoE); num_experts == 0 means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name} must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "config.json: num_attention_heads must be a multiple of num_key_value_heads"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"config.json: hidden_act {self.hidden_act!r} is not supported")
        kind = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type"))
        if kind not in ROPE_TYPES and self.architecture not in OWN_ATTENTION:
            raise ConfigError(f"config.json: rope type {kind!r} is not supported")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not archs:
            raise ConfigError("config.json has no 'architectures' entry")
        _check_full_attention(cfg)
        try:
            heads = int(cfg["num_attention_heads"])
            rope_theta, rope_scaling = _rope(cfg)
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                architecture=archs[0],
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg.get("intermediate_size", 0)),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=archs[0].startswith("Qwen3"),
                hidden_act=cfg.get("hidden_act", "silu"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                bos_token_id=cfg.get("bos_token_id"),
                num_experts=int(_get(cfg, "num_experts", "num_local_experts", default=0)),
                num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0) or 0),
                moe_intermediate_size=int(cfg.get("moe_intermediate_size", 0) or 0),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1) or 1),
                mlp_only_layers=tuple(cfg.get("mlp_only_layers", ()) or ()),
                raw=cfg,
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing required field {e.args[0]!r}") from None
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a field of the wrong type ({e})") from None

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Layer `layer_idx` has a mixture-of-experts MLP (transformers' Qwen3-MoE rule)."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg = read_config_json(path)
        gen = path / "generation_config.json"
        if gen.is_file() and "eos_token_id" in (g := json.loads(gen.read_text())):
            eos = g["eos_token_id"]
            merged = set(eos if isinstance(eos, list) else [eos])
            base = cfg.get("eos_token_id")
            merged |= set(base if isinstance(base, list) else ([] if base is None else [base]))
            cfg = {**cfg, "eos_token_id": sorted(merged)}
        return cls.from_dict(cfg)


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16
    num_blocks: int | None = None  # None: derived from max_total_tokens / mem_fraction_static
    max_total_tokens: int | None = None
    mem_fraction_static: float = 0.1  # of available RAM (CPU) or free device memory
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; else a key of KV_CACHE_DTYPES

    def __post_init__(self) -> None:
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"--kv-cache-dtype must be auto or one of {', '.join(KV_CACHE_DTYPES)}, "
                f"not {self.kv_cache_dtype!r}"
            )
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ConfigError("--page-size must be a positive power of two")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ConfigError("--max-total-tokens must be at least --page-size")
        if not 0.0 < self.mem_fraction_static <= 1.0:
            raise ConfigError("--mem-fraction-static must be in (0, 1]")

    def kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The K/V cache's dtype: the model's under "auto"."""
        if self.kv_cache_dtype == "auto":
            return model_dtype
        return KV_CACHE_DTYPES[self.kv_cache_dtype]


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_requests: int = 64
    chunked_prefill_size: int = 2048  # token budget of one forward
    context_length: int = 4096
    max_queued_requests: int = 4096

    def __post_init__(self) -> None:
        if self.max_running_requests <= 0:
            raise ConfigError("--max-running-requests must be positive")
        if self.chunked_prefill_size <= 0:
            raise ConfigError("--chunked-prefill-size must be positive")
        if self.context_length <= 1:
            raise ConfigError("--context-length must be at least 2")
        if self.max_queued_requests <= 0:
            raise ConfigError("--max-queued-requests must be positive")


def physical_cores() -> int:
    """CPU cores without hyper-threads (torch's own default thread count)."""
    import psutil

    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str = "torch"
    num_threads: int | None = None  # torch CPU threads; None keeps the process's setting
    grammar_backend: str = "llguidance"  # structured output: llguidance | none

    def __post_init__(self) -> None:
        from specserve.models.attention import ATTENTION_BACKENDS

        if self.grammar_backend not in ("llguidance", "none"):
            raise ConfigError("--grammar-backend must be llguidance or none")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}")
        if self.attention_backend == "cpp" and not self.device.startswith("cpu"):
            raise ConfigError("--attention-backend cpp runs on the CPU; use torch on --device cuda")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ConfigError("--num-threads must be positive")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ConfigError("--device must be cpu or cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but CUDA is not available")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


SPEC_ALGORITHMS = ("NONE", "NGRAM", "NEXTN", "DFLASH", "DSPARK")
VERIFY_POLICIES = ("full", "threshold", "scheduler")


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding (`--speculative-*` flags). MTP is accepted as an alias of NEXTN.

    num_draft_tokens counts the verify window as SGLang does: draft tokens + 1. None: the
    algorithm's default (NGRAM 5, NEXTN num_steps + 1, DFLASH / DSPARK block size + 1).
    block_size (DFLASH / DSPARK) None: the drafter checkpoint's. verify_policy None: scheduler
    for DSPARK, full otherwise. adaptive_drafting (default on): per request and step, draft
    only where the measured cost is repaid by the expected acceptance (`speculative/gate.py`).
    """

    algorithm: str = "NONE"
    draft_model_path: str | None = None
    num_steps: int | None = None
    eagle_topk: int = 1
    num_draft_tokens: int | None = None
    block_size: int | None = None
    verify_policy: str | None = None
    confidence_threshold: float = 0.5
    sps_table_path: str | None = None
    confidence_sts_path: str | None = None
    adaptive_drafting: bool = True  # skip drafting for requests where it does not pay

    def __post_init__(self) -> None:
        algo = self.algorithm.upper()
        algo = "NEXTN" if algo == "MTP" else algo
        object.__setattr__(self, "algorithm", algo)
        if algo not in SPEC_ALGORITHMS:
            raise ConfigError(
                f"--speculative-algorithm {self.algorithm!r} is not one of "
                f"{', '.join(SPEC_ALGORITHMS)}, MTP"
            )
        if algo in ("NEXTN", "DFLASH", "DSPARK") and not self.draft_model_path:
            raise ConfigError(
                f"--speculative-algorithm {algo} needs --speculative-draft-model-path"
            )
        if self.eagle_topk != 1:
            raise ConfigError(
                f"--speculative-eagle-topk {self.eagle_topk} is not supported: only chain drafts "
                "(topk 1) are implemented"
            )
        if self.num_steps is not None and self.num_steps < 1:
            raise ConfigError("--speculative-num-steps must be at least 1")
        if self.num_draft_tokens is not None and self.num_draft_tokens < 2:
            raise ConfigError(
                "--speculative-num-draft-tokens must be at least 2 (the last token + 1 draft)"
            )
        if (
            algo == "NEXTN"
            and self.num_steps is not None
            and self.num_draft_tokens is not None
            and self.num_draft_tokens != self.num_steps + 1
        ):
            raise ConfigError(
                "with --speculative-eagle-topk 1, --speculative-num-draft-tokens must equal "
                f"--speculative-num-steps + 1 (got {self.num_draft_tokens} and {self.num_steps})"
            )
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError("--speculative-dspark-block-size must be at least 1")
        if self.verify_policy is not None and self.verify_policy not in VERIFY_POLICIES:
            raise ConfigError(
                f"--speculative-verify-policy {self.verify_policy!r} is not one of "
                f"{', '.join(VERIFY_POLICIES)}"
            )
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ConfigError("--speculative-dspark-confidence-threshold must be in [0, 1]")

    @property
    def policy(self) -> str:
        """The verify policy in effect."""
        if self.verify_policy is not None:
            return self.verify_policy
        return "scheduler" if self.algorithm == "DSPARK" else "full"
