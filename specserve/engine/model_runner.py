"""Runs the target model over one flattened batch against the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from specserve.config import CacheConfig, ModelConfig
from specserve.models.attention import PagedAttention
from specserve.models.qwen3 import CausalLM


@dataclass
class BatchSeq:
    """One sequence's part of a forward: its new tokens and the cache blocks it owns."""

    token_ids: list[int]
    start_position: int  # position of token_ids[0]; earlier positions are already cached
    block_table: list[int]
    logits_from: int  # compute logits for token_ids[logits_from:] (len(token_ids) = none)


@dataclass
class ForwardResult:
    logits: torch.Tensor  # [M, V] float32, rows for each sequence's logits tokens, in order
    logits_counts: list[int]  # rows per sequence
    hidden: torch.Tensor  # [N, H] final hidden states of all tokens
    captured: torch.Tensor | None  # [N, len(capture) * H]


def kv_bytes_per_token(model_cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes one more token costs: a K and a V per layer, unless the model class defines
    its own `cache_bytes_per_token` (a compressed cache)."""
    from specserve.models.registry import model_class

    own = getattr(model_class(model_cfg.architecture), "cache_bytes_per_token", None)
    if own is not None:
        return own(model_cfg, dtype)
    heads, dim = model_cfg.num_key_value_heads, model_cfg.head_dim
    return 2 * model_cfg.num_hidden_layers * heads * dim * torch.finfo(dtype).bits // 8


def num_kv_blocks(model_cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    """Blocks from --max-total-tokens, else a fraction of free memory."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if cache.max_total_tokens is not None:
        return -(-cache.max_total_tokens // cache.page_size)
    per_token = kv_bytes_per_token(model_cfg, dtype)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        free = torch.cuda.mem_get_info()[0]
    else:
        free = psutil.virtual_memory().available
    return max(4, int(free * cache.mem_fraction_static) // (per_token * cache.page_size))


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        page_size: int,
        dtype: torch.dtype,
        device: str,
        capture: tuple[int, ...] = (),
    ) -> None:
        self.model, self.page_size, self.device, self.capture = model, page_size, device, capture
        shape = (num_blocks * page_size, *model.kv_head_shape())  # this rank's KV heads under TP
        layers = range(model.config.num_hidden_layers)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        blocks = torch.tensor(block_table, dtype=torch.long)
        slots = (blocks[:, None] * self.page_size + torch.arange(self.page_size)).reshape(-1)
        return slots[start:end]

    @torch.inference_mode()
    def forward(self, seqs: list[BatchSeq]) -> ForwardResult:
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        counts: list[int] = []
        new_slots: list[torch.Tensor] = []
        kv_slots: list[torch.Tensor] = []
        offset = 0
        for s in seqs:
            n = len(s.token_ids)
            end = s.start_position + n
            ids.extend(s.token_ids)
            pos.extend(range(s.start_position, end))
            all_slots = self._slots(s.block_table, 0, end)
            new_slots.append(all_slots[s.start_position :])
            kv_slots.append(all_slots.to(self.device))
            rows.extend(range(offset + s.logits_from, offset + n))
            counts.append(n - s.logits_from)
            offset += n
        dev = self.device
        ctx = PagedAttention(
            self.k_cache,
            self.v_cache,
            torch.cat(new_slots).to(dev),
            [len(s.token_ids) for s in seqs],
            kv_slots,
        )
        out = self.model(
            torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), ctx, self.capture
        )
        logits = self.model.compute_logits(
            out.hidden[torch.tensor(rows, dtype=torch.long, device=dev)]
        )
        return ForwardResult(logits, counts, out.hidden, out.captured)

    @torch.inference_mode()
    def profile_forward(self, num_tokens: int, num_blocks: int, window: int = 8) -> None:
        """Time-representative forward: num_tokens split into verify windows of `window` tokens
        over a shared scratch context (all sequences reuse the same blocks; content is garbage)."""
        context = max(0, min(64, num_blocks * self.page_size - window))
        table = list(range(-(-(context + window) // self.page_size)))
        seqs, left = [], num_tokens
        while left > 0:
            n = min(window, left)
            seqs.append(BatchSeq([0] * n, context, table, 0))
            left -= n
        self.forward(seqs)
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()
