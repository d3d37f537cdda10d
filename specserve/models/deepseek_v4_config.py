"""DeepSeek-V4's own config fields, read from `config.json` as `transformers` 5.24 reads them.

Legacy keys of the official checkpoints fold in as `DeepseekV4Config.__post_init__` does:
`compress_ratios` (per layer 0 / 4 / 128) -> `layer_types`, `compress_rate_csa/_hca` ->
`compress_rates`, `num_hash_layers` -> `mlp_layer_types`, `qk_rope_head_dim` -> the RoPE width,
a flat `rope_scaling` / `rope_parameters` -> the `main` (plain) and `compress` (YaRN) RoPEs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specserve.config import ConfigError, ModelConfig

SLIDING, CSA, HCA = (
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
)
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}
SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")


@dataclass(frozen=True)
class V4Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rope_dim: int  # trailing dims of each head that get (interleaved) RoPE
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    layer_types: tuple[str, ...]
    compress_rates: dict[str, int]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    scoring_func: str
    routed_scaling_factor: float
    hash_layers: tuple[bool, ...]
    swiglu_limit: float
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    main_rope: dict[str, Any]
    compress_rope: dict[str, Any]
    max_position_embeddings: int
    num_nextn_predict_layers: int
    fp4_experts: bool = False  # routed experts stored as FP4 (served as MXFP4)
    fp8_block: int = 128  # block size of FP8 weights' scales

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_layers or len(self.hash_layers) != self.num_layers:
            raise ConfigError("config.json: layer_types / mlp_layer_types need one entry per layer")
        bad = [t for t in self.layer_types if t not in (SLIDING, CSA, HCA)]
        if bad:
            raise ConfigError(f"config.json: unknown DeepSeek-V4 layer type {bad[0]!r}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"config.json: scoring_func {self.scoring_func!r} is not supported")
        if (self.num_heads * self.head_dim) % self.o_groups:
            raise ConfigError("config.json: o_groups must divide num_attention_heads * head_dim")
        if self.rope_dim % 2 or self.rope_dim > min(self.head_dim, self.index_head_dim):
            raise ConfigError("config.json: the RoPE width must be even and fit every head")

    def compress_rate(self, layer: int) -> int:
        """0 for a window-only layer."""
        return self.compress_rates.get(self.layer_types[layer], 0)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> V4Config:
        raw = cfg.raw
        n = cfg.num_hidden_layers
        try:
            head_dim = int(raw.get("head_dim", 512))
            return cls(
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size,
                num_layers=n,
                num_heads=cfg.num_attention_heads,
                head_dim=head_dim,
                rope_dim=_rope_dim(raw, head_dim),
                q_lora_rank=int(raw["q_lora_rank"]),
                o_groups=int(raw["o_groups"]),
                o_lora_rank=int(raw["o_lora_rank"]),
                sliding_window=int(raw["sliding_window"]),
                layer_types=_layer_types(raw, n),
                compress_rates=_compress_rates(raw),
                index_n_heads=int(raw["index_n_heads"]),
                index_head_dim=int(raw["index_head_dim"]),
                index_topk=int(raw["index_topk"]),
                num_experts=int(raw["n_routed_experts"]),
                top_k=int(raw["num_experts_per_tok"]),
                moe_intermediate_size=int(raw["moe_intermediate_size"]),
                scoring_func=raw.get("scoring_func", "sqrtsoftplus"),
                routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
                hash_layers=_hash_layers(raw, n),
                swiglu_limit=float(raw.get("swiglu_limit", 10.0)),
                hc_mult=int(raw.get("hc_mult", 4)),
                hc_sinkhorn_iters=int(raw.get("hc_sinkhorn_iters", 20)),
                hc_eps=float(raw.get("hc_eps", 1e-6)),
                rms_norm_eps=cfg.rms_norm_eps,
                main_rope=_rope(raw, "main"),
                compress_rope=_rope(raw, "compress"),
                max_position_embeddings=cfg.max_position_embeddings,
                num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers", 0)),
                fp4_experts=_expert_dtype(raw) == "fp4",
                fp8_block=int(
                    ((raw.get("quantization_config") or {}).get("weight_block_size") or [128])[0]
                ),
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing required field {e.args[0]!r}") from None


def _expert_dtype(raw: dict) -> str | None:
    """`expert_dtype` at the top level (V4) or in `quantization_config` (V4.1)."""
    return raw.get("expert_dtype") or (raw.get("quantization_config") or {}).get("expert_dtype")


def _rope_dim(raw: dict, head_dim: int) -> int:
    if raw.get("qk_rope_head_dim") is not None:
        return int(raw["qk_rope_head_dim"])
    return int(head_dim * float(raw.get("partial_rotary_factor") or 64 / 512))


def _layer_types(raw: dict, n: int) -> tuple[str, ...]:
    if raw.get("layer_types") is not None:
        return tuple(raw["layer_types"][:n])
    if raw.get("compress_ratios") is not None:
        try:
            return tuple(_RATIO_TO_TYPE[int(r)] for r in raw["compress_ratios"][:n])
        except KeyError as e:
            raise ConfigError(f"config.json: compress_ratios entry {e.args[0]} unknown") from None
    rest = [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    return tuple([HCA] * min(n, 2) + rest)


def _compress_rates(raw: dict) -> dict[str, int]:
    rates = {CSA: 4, HCA: 128, **(raw.get("compress_rates") or {})}
    if raw.get("compress_rate_csa") is not None:
        rates[CSA] = int(raw["compress_rate_csa"])
    if raw.get("compress_rate_hca") is not None:
        rates[HCA] = int(raw["compress_rate_hca"])
    return {k: int(v) for k, v in rates.items()}


def _hash_layers(raw: dict, n: int) -> tuple[bool, ...]:
    if raw.get("mlp_layer_types") is not None:
        return tuple(t == "hash_moe" for t in raw["mlp_layer_types"][:n])
    n_hash = int(raw.get("num_hash_layers", 3))
    return tuple(i < n_hash for i in range(n))


def _rope(raw: dict, kind: str) -> dict[str, Any]:
    """The `main` (window-only layers) or `compress` (CSA / HCA, compressors, indexer) RoPE."""
    rp = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        return dict(rp[kind])
    if kind == "main":
        return {"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000.0))}
    params = {k: v for k, v in rp.items() if k not in ("main", "compress")}
    params["rope_theta"] = float(raw.get("compress_rope_theta", 160000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] == "yarn":
        params.setdefault("attention_factor", 1.0)
    return params
