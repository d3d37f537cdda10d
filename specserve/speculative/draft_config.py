"""`DraftConfig`: a DFlash / DSpark drafter's config (the DeepSpec `config.json` layout).

A drafter's config.json is its target's config plus the drafter's own fields
(`target_layer_ids`, `num_target_layers`, `block_size`, `mask_token_id`, the Markov and
confidence head fields), with `num_hidden_layers` counting draft layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from specserve.config import ConfigError, ModelConfig

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


@dataclass(frozen=True)
class DraftConfig:
    """A DFlash / DSpark drafter: the target's dimensions plus the drafter's own fields.

    `model` carries the transformer dimensions (the target's, with `num_hidden_layers` = draft
    layers). `raw` is the target config the drafter's config.json was built from.
    """

    model: ModelConfig
    target_layer_ids: tuple[int, ...]
    num_target_layers: int
    block_size: int
    mask_token_id: int
    architecture: str = "Qwen3DSparkModel"
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        n = self.num_target_layers
        ids = self.target_layer_ids
        if not ids:
            raise ConfigError("drafter config: target_layer_ids must not be empty")
        if any(not (i == -1 or 0 <= i < n) for i in ids) or list(ids) != sorted(set(ids)):
            raise ConfigError(
                f"drafter config: target_layer_ids {list(ids)} must be strictly increasing "
                f"ids in {{-1}} U [0, {n - 1}] (num_target_layers = {n})"
            )
        if self.block_size < 1:
            raise ConfigError("drafter config: block_size must be at least 1")
        if not 0 <= self.mask_token_id < self.model.vocab_size:
            raise ConfigError(
                f"drafter config: mask_token_id {self.mask_token_id} is outside the vocabulary "
                f"[0, {self.model.vocab_size})"
            )
        if self.markov_rank < 0:
            raise ConfigError("drafter config: markov_rank must be >= 0")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise ConfigError(
                f"drafter config: markov_head_type {self.markov_head_type!r} is not one of "
                f"{', '.join(MARKOV_HEAD_TYPES)}"
            )
        if self.confidence_head_with_markov and not (
            self.enable_confidence_head and self.markov_rank > 0
        ):
            raise ConfigError(
                "drafter config: confidence_head_with_markov needs enable_confidence_head and "
                "markov_rank > 0"
            )

    @classmethod
    def from_target(
        cls, target: dict[str, Any], num_hidden_layers: int, **fields_: Any
    ) -> DraftConfig:
        """A drafter for the target whose config.json is `target` (a dict)."""
        raw = {**target, "num_hidden_layers": num_hidden_layers}
        arch = fields_.get("architecture", cls.architecture)
        model = ModelConfig.from_dict({**raw, "architectures": [arch]})
        fields_.setdefault("num_target_layers", int(target["num_hidden_layers"]))
        fields_["target_layer_ids"] = tuple(int(i) for i in fields_["target_layer_ids"])
        return cls(model=replace(model, qk_norm=True), raw=raw, **fields_)

    def to_dict(self) -> dict[str, Any]:
        """The drafter's config.json (DeepSpec layout): target config + drafter fields."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_SAVED}
        own["target_layer_ids"] = list(self.target_layer_ids)
        arch = own.pop("architecture")
        return {
            **self.raw,
            **own,
            "architectures": [arch],
            "num_hidden_layers": self.model.num_hidden_layers,
            "tie_word_embeddings": False,
        }


_NOT_SAVED = ("model", "raw")
