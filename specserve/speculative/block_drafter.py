"""The engine's drafter for the block-parallel models (DFlash, DSpark): per request, the draft
layers' context K/V of every committed position (`ContextCache`, grown by `update`); `propose`
drafts one block for every request in one backbone forward, then picks its tokens left to right
(`DFlashDraftModel.draft`: argmax for greedy requests, else a sample reported exactly)."""

from __future__ import annotations

import torch

from specserve.core import Request
from specserve.speculative.base import Drafter, DraftProposal
from specserve.speculative.calibration import apply_sts
from specserve.speculative.context_cache import ContextCache
from specserve.speculative.deepseek_v4_dspark import DeepseekV4DSparkModel
from specserve.speculative.dflash import DFlashDraftModel
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
        self.contexts: dict[str, ContextCache] = {}

    @property
    def max_draft_tokens(self) -> int:
        return self.block_size

    @torch.inference_mode()
    def update(self, requests: list[Request], hidden: list[torch.Tensor | None]) -> None:
        rows, pos, owners = [], [], []
        for req, h in zip(requests, hidden, strict=True):
            if h is None or h.shape[0] == 0 or req.finished:
                continue
            end = req.num_computed_tokens
            rows.append(h)
            pos.append(torch.arange(end - h.shape[0], end, device=h.device))
            owners.append((req.request_id, h.shape[0]))
        if not rows:
            return
        positions = torch.cat(pos)
        kv = self.model.context_kv(torch.cat(rows).to(self.model.context_dtype), positions)
        start = 0
        for rid, n in owners:
            part = [tuple(t[start : start + n] for t in layer) for layer in kv]
            cache = self.contexts.setdefault(rid, ContextCache(self.model.context_rows))
            cache.add(part, positions[start : start + n])
            start += n

    def release(self, request: Request) -> None:
        self.contexts.pop(request.request_id, None)

    def num_tracked_requests(self) -> int:
        return len(self.contexts)

    @torch.inference_mode()
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[DraftProposal]:
        ks = [min(self.block_size, m) for m in max_tokens]
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
        hidden = self.model.draft_hidden(
            anchor,
            torch.tensor([r.num_tokens - 1 for r in reqs], device=dev),
            [self.contexts[r.request_id].kv for r in reqs],
            k,
        )
        tokens, q, proxy = self.model.draft(hidden, anchor, lambda logits: draw(logits, reqs))
        conf_logits = self.model.block_confidence_logits(hidden, anchor, tokens)
        conf = proxy if conf_logits is None else self.calibrated(conf_logits)
        for j, i in enumerate(live):
            n = ks[i]
            out[i] = DraftProposal(
                tokens[j, :n].tolist(), proposal_probs(q[j, :n], reqs[j]), conf[j, :n]
            )
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
