"""The target's parts a drafter shares, handed to the drafter when it is built.

Drafters read the target's embedding, final norm and LM head (frozen, shared, never copied) and
the hidden states of some of its layers. `TargetHandle` carries exactly those, so no drafter
reaches into a model by attribute name and a drafter works the same over any target layout.
Under tensor parallelism the target's embedding and LM head are split by vocab (and computed
with collectives only rank 0 would join), so `TargetHandle.unsplit` gives rank 0's drafter
whole copies read from the checkpoint; the final norm is replicated on every rank and shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from specserve.config import ConfigError, ModelConfig
from specserve.models.layers import Linear
from specserve.models.loader import load_state_dict
from specserve.models.qwen3 import CausalLM

_WEIGHTS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True, eq=False)
class TargetHandle:
    """What a drafter may use of its target: `config` (vocab, hidden size, layer count), the
    embedding, the final norm and the LM head. `capture(ids)` names the layers whose hidden
    states the engine delivers to the drafter's `update`."""

    config: ModelConfig
    embed_tokens: nn.Module
    norm: nn.Module
    lm_head: nn.Module

    @classmethod
    def of(cls, model: CausalLM) -> TargetHandle:
        """The shared parts of a target that runs in this process (not tensor-parallel)."""
        return cls(model.config, model.model.embed_tokens, model.model.norm, model.lm_head)

    @classmethod
    def unsplit(
        cls, model: CausalLM, path: str | Path, dtype: torch.dtype, device: str
    ) -> TargetHandle:
        """Rank 0's handle under tensor parallelism: whole embedding and LM head from `path`."""
        cfg = model.config
        state = load_state_dict(path, lambda k: k in _WEIGHTS)
        embed = nn.Embedding.from_pretrained(state[_WEIGHTS[0]].to(device, dtype), freeze=True)
        with torch.device("meta"):
            head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            head.weight = embed.weight
        else:
            head.weight = nn.Parameter(state[_WEIGHTS[1]].to(device, dtype), requires_grad=False)
        return cls(cfg, embed, model.model.norm, head)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def capture(self, layer_ids: tuple[int, ...] | list[int]) -> tuple[int, ...]:
        """Checked ids of target layers whose output a drafter reads (-1 = embedding output)."""
        n = self.num_layers
        ids = tuple(int(i) for i in layer_ids)
        if any(not (i == -1 or 0 <= i < n) for i in ids):
            raise ConfigError(
                f"drafter does not fit the target: layer ids {list(ids)} are not all in "
                f"{{-1}} U [0, {n - 1}] (the target has {n} layers)"
            )
        return ids
