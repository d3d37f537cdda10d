"""The engine's drafter for the block-parallel models (DFlash, DSpark): per request, the draft
layers' context K/V of every committed position (`ContextCache`; `update` defers the rows,
`propose` folds in those of the requests it drafts for, `deferred.py`), then drafts one block for
every request in one backbone forward, then picks its tokens left to right
(`DFlashDraftModel.draft`: argmax for greedy requests, else a sample reported exactly). A batch
of greedy requests takes the fused C++ step when the drafter fits it (`fused_draft.py`)."""

from __future__ import annotations

import torch

from specserve.core import Request
from specserve.speculative.base import Drafter, DraftProposal
from specserve.speculative.calibration import apply_sts
from specserve.speculative.context_cache import ContextCache
from specserve.speculative.deepseek_v4_dspark import DeepseekV4DSparkModel
from specserve.speculative.deferred import DeferredRows
from specserve.speculative.dflash import DFlashDraftModel
from specserve.speculative.fused_draft import FusedDraft
from specserve.speculative.sampling import draw, proposal_probs


class DFlashDrafter(Drafter):
    """Drafts `block_size` tokens per step with one backbone forward over [anchor, mask...].

    Confidences: the model's confidence head (DSpark), calibrated by `sts_temperatures` [K]
    (`calibration.load_sts`) when given; without a head, the drafter's own max_v q_k(v)."""

    def __init__(
        self,
        model: DFlashDraftModel | DeepseekV4DSparkModel,
        block_size: int | None = None,
        sts_temperatures: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.block_size = block_size or model.config.block_size
        self.sts = sts_temperatures
        self.capture_layers = model.capture_layers
        self.has_confidence_head = getattr(model, "confidence_head", None) is not None
        self.contexts: dict[str, ContextCache] = {}
        self.deferred = DeferredRows()
        self.fused = FusedDraft.of(model)  # None: the PyTorch path only

    @property
    def max_draft_tokens(self) -> int:
        return self.block_size

    def update(self, requests: list[Request], hidden: list[torch.Tensor | None]) -> None:
        self.deferred.add(requests, hidden)  # folded in when the request drafts next

    def _catch_up(self, pending: list[tuple[Request, int, torch.Tensor]]) -> None:
        """Project the pending rows (`DeferredRows.fold`) into their contexts, in one forward."""
        positions = torch.cat(
            [torch.arange(s, s + h.shape[0], device=h.device) for _, s, h in pending]
        )
        rows = torch.cat([h for _, _, h in pending]).to(self.model.context_dtype)
        kv = (self.model if self.fused is None else self.fused).context_kv(rows, positions)
        start = 0
        for req, _, h in pending:
            n = h.shape[0]
            part = [tuple(t[start : start + n] for t in layer) for layer in kv]
            cache = self.contexts.setdefault(req.request_id, ContextCache(self.model.context_rows))
            cache.add(part, positions[start : start + n])
            start += n

    def release(self, request: Request) -> None:
        self.contexts.pop(request.request_id, None)
        self.deferred.drop(request.request_id)

    def num_tracked_requests(self) -> int:
        return len(self.contexts.keys() | self.deferred.pending.keys())

    @torch.inference_mode()
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[DraftProposal]:
        ks = [min(self.block_size, m) for m in max_tokens]
        self.catch_up = self.deferred.fold(
            [r for r, k in zip(requests, ks, strict=True) if k > 0], self._catch_up
        )
        live = [i for i, k in enumerate(ks) if k > 0 and requests[i].request_id in self.contexts]
        out = [DraftProposal([]) for _ in requests]
        if not live:
            return out
        reqs = [requests[i] for i in live]
        # Always the whole block, as trained: slots attend to each other both ways, so a shorter
        # block would change the drafts of the slots kept. A request with less room keeps fewer.
        k = self.block_size
        dev = self.model.device
        anchor = torch.tensor([r.last_token_id for r in reqs], device=dev)
        positions = torch.tensor([r.num_tokens - 1 for r in reqs], device=dev)
        contexts = [self.contexts[r.request_id].kv for r in reqs]
        if self.fused is not None and all(r.params.greedy for r in reqs):
            tokens, c = self.fused(anchor, positions, contexts, k)
            conf = self.calibrated(c) if self.fused.has_confidence_head else c
            return self._proposals(out, live, ks, tokens, conf)
        if self.fused is not None:
            hidden = self.fused.hidden(anchor, positions, contexts, k)
        else:
            hidden = self.model.draft_hidden(anchor, positions, contexts, k)
        tokens, q, proxy = self.model.draft(hidden, anchor, lambda logits: draw(logits, reqs))
        conf_logits = self.model.block_confidence_logits(hidden, anchor, tokens)
        conf = proxy if conf_logits is None else self.calibrated(conf_logits)
        probs = [proposal_probs(q[j, : ks[i]], reqs[j]) for j, i in enumerate(live)]
        return self._proposals(out, live, ks, tokens, conf, probs)

    @staticmethod
    def _proposals(
        out: list[DraftProposal],
        live: list[int],
        ks: list[int],
        tokens: torch.Tensor,
        conf: torch.Tensor,
        probs: list[torch.Tensor | None] | None = None,
    ) -> list[DraftProposal]:
        """Row j of tokens / conf [len(live), K] (and probs[j]) is request live[j]'s block; it
        keeps its first ks[live[j]] slots."""
        for j, i in enumerate(live):
            n = ks[i]
            q = None if probs is None else probs[j]
            out[i] = DraftProposal(tokens[j, :n].tolist(), q, conf[j, :n])
        return out

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """Confidence logits [R, K] -> c [R, K] (STS temperatures when given)."""
        if self.sts is None:
            return torch.sigmoid(logits)
        k = logits.shape[1]
        t = self.sts[:k]
        if t.numel() < k:  # a block longer than the calibration: reuse the last temperature
            t = torch.cat([t, t[-1:].expand(k - t.numel())])
        return apply_sts(logits, t)
