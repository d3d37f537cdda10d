"""DSpark: the DFlash backbone plus a sequential Markov head and a confidence head.

The backbone gives base logits U_k for the K block slots in one forward. The Markov head adds a
bias from the token at the previous slot, B(x_{k-1}) = W1[x_{k-1}] W2 (`markov_w1`: V x r
embedding, `markov_w2`: r -> V), so drafting runs left to right with
p_k = softmax(U_k + B(x_{k-1})) (x_{-1} is the anchor). Variants (`markov_head_type`):

* vanilla: bias = W2(W1[x])
* gated:   bias = W2(sigmoid(gate_proj([h_k; W1[x]])) * W1[x])
* rnn:     s_k = g * s_{k-1} + (1 - g) * tanh(c), bias = W2(tanh(o)) with
           [g; c; o] = joint_proj([s_{k-1}; W1[x]; h_k]), s_{-1} = 0

The confidence head `confidence_head.proj` maps [h_k] (or [h_k; W1[x_{k-1}]] with
`confidence_head_with_markov`) to a logit of c_k = P(slot k accepted | slots < k accepted).
Every draft distribution is an exact softmax, so rejection sampling stays lossless.

Training API (`DSparkDraftModel.forward`) -- the DFlash arguments (see `dflash.py`)::

    out = model(input_ids, target_hidden, anchors, anchor_mask)
    out.hidden, out.target_ids, out.valid       as DFlashOutput
    out.base_logits        [B, A, K, V]  backbone logits U_k
    out.logits             [B, A, K, V]  U_k + Markov bias from the previous *true* token
                                         (teacher forcing: x_{-1} = anchor, x_{k-1} = target_ids)
    out.confidence_logits  [B, A, K] float32 or None; c_k = sigmoid(logit)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from specserve.models.layers import Linear
from specserve.speculative.dflash import BlockDrafting, DFlashDraftModel, DFlashOutput
from specserve.speculative.draft_config import DraftConfig
from specserve.speculative.draft_masks import safe_anchors


class MarkovHead(nn.Module):
    """The sequential stage; `step` is one slot, `teacher_forced` a whole block."""

    def __init__(self, kind: str, vocab: int, rank: int, hidden: int) -> None:
        super().__init__()
        self.kind = kind
        self.rank = rank
        self.markov_w1 = nn.Embedding(vocab, rank)
        self.markov_w2 = Linear(rank, vocab)
        if kind == "gated":
            self.gate_proj = Linear(hidden + rank, rank, bias=True)
        elif kind == "rnn":
            self.joint_proj = Linear(2 * rank + hidden, 3 * rank, bias=True)

    def prev_embedding(self, prev: torch.Tensor) -> torch.Tensor:
        return self.markov_w1(prev)

    def step(
        self, prev: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prev [...] token at slot k-1, hidden [..., H] at slot k, state [..., r] (rnn only)
        -> (bias [..., V] float32, new state)."""
        e = self.markov_w1(prev).to(hidden.dtype)
        if self.kind == "vanilla":
            z = e
        elif self.kind == "gated":
            z = torch.sigmoid(self.gate_proj(torch.cat([hidden, e], dim=-1))) * e
        else:
            if state is None:
                state = e.new_zeros(e.shape)
            g, c, o = self.joint_proj(torch.cat([state, e, hidden], dim=-1)).chunk(3, dim=-1)
            g = torch.sigmoid(g)
            state = g * state + (1.0 - g) * torch.tanh(c)
            z = torch.tanh(o)
        return self.markov_w2(z).float(), state

    def teacher_forced(self, prev: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """prev [..., K], hidden [..., K, H] -> bias [..., K, V] (slot k conditioned on prev[k])."""
        if self.kind != "rnn":
            return self.step(prev, hidden, None)[0]
        state, out = None, []
        for k in range(prev.shape[-1]):
            bias, state = self.step(prev[..., k], hidden[..., k, :], state)
            out.append(bias)
        return torch.stack(out, dim=-2)


class ConfidenceHead(nn.Module):
    def __init__(self, in_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = Linear(in_dim, 1, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1).float()


@dataclass
class DSparkOutput(DFlashOutput):
    base_logits: torch.Tensor | None = None  # [B, A, K, V]
    confidence_logits: torch.Tensor | None = None  # [B, A, K]


class DSparkHeads(BlockDrafting):
    """The drafting steps DSpark adds to a block backbone (the Qwen3-style DSpark here, the
    DeepSeek-V4 one in `deepseek_v4_dspark.py`): the Markov bias and the confidence logits."""

    markov_head: MarkovHead | None
    confidence_head: ConfidenceHead | None
    confidence_with_markov: bool  # the confidence head also reads W1[x_{k-1}]

    def markov_step(
        self,
        base: torch.Tensor,
        prev: torch.Tensor,
        hidden: torch.Tensor,
        state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Corrected logits of one slot: base [..., V] + bias(prev [...], hidden [..., H])."""
        if self.markov_head is None:
            return base, state
        bias, state = self.markov_head.step(prev, hidden, state)
        return base + bias, state

    def confidence_logits(self, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor | None:
        """hidden [..., H], prev [...] token before each slot -> logits [...] (None: no head)."""
        if self.confidence_head is None:
            return None
        if self.markov_head is not None and self.confidence_with_markov:
            e = self.markov_head.prev_embedding(prev).to(hidden.dtype)
            hidden = torch.cat([hidden, e], dim=-1)
        return self.confidence_head(hidden)


class DSparkDraftModel(DSparkHeads, DFlashDraftModel):
    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__(cfg)
        m = cfg.model
        self.markov_head = (
            MarkovHead(cfg.markov_head_type, m.vocab_size, cfg.markov_rank, m.hidden_size)
            if cfg.markov_rank > 0
            else None
        )
        self.confidence_head = None
        if cfg.enable_confidence_head:
            extra = cfg.markov_rank if cfg.confidence_head_with_markov else 0
            self.confidence_head = ConfidenceHead(m.hidden_size + extra)
        self.confidence_with_markov = cfg.confidence_head_with_markov

    def forward(
        self,
        input_ids: torch.Tensor,
        target_hidden: torch.Tensor,
        anchors: torch.Tensor,
        anchor_mask: torch.Tensor | None = None,
    ) -> DSparkOutput:
        hidden, target_ids, valid = self.run_blocks(input_ids, target_hidden, anchors, anchor_mask)
        base = self.compute_logits(hidden)
        anchors, _ = safe_anchors(anchors, anchor_mask, input_ids.shape[1])
        anchor_tok = input_ids.gather(1, anchors)
        prev = torch.cat([anchor_tok[..., None], target_ids[..., :-1]], dim=-1)
        logits = base
        if self.markov_head is not None:
            logits = base + self.markov_head.teacher_forced(prev, hidden)
        return DSparkOutput(
            hidden=hidden,
            logits=logits,
            target_ids=target_ids,
            valid=valid,
            base_logits=base,
            confidence_logits=self.confidence_logits(hidden, prev),
        )
