"""Runs the target model over one flattened batch against the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from specserve.config import CacheConfig, ModelConfig
from specserve.models.attention import PagedBatch, make_attention_backend
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
        attention_backend: str = "torch",
    ) -> None:
        self.model, self.page_size, self.device, self.capture = model, page_size, device, capture
        self.backend = make_attention_backend(attention_backend)
        kv_heads, head_dim = model.kv_head_shape()  # this rank's KV heads under TP
        self.kv_cache = self.backend.allocate(
            model.config.num_hidden_layers, num_blocks, page_size, kv_heads, head_dim, dtype, device
        )

    def _batch(self, seqs: list[BatchSeq]) -> tuple[PagedBatch, torch.Tensor, torch.Tensor]:
        """The step's cache layout, token positions and logits rows, with tensor ops only."""
        qlens = torch.tensor([len(s.token_ids) for s in seqs])
        starts = torch.tensor([s.start_position for s in seqs])
        logits_from = torch.tensor([s.logits_from for s in seqs])
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])
        seq = torch.repeat_interleave(torch.arange(len(seqs)), qlens)  # [N] sequence of a token
        local = torch.arange(len(seq)) - (torch.cumsum(qlens, 0) - qlens)[seq]
        positions = starts[seq] + local
        pages = tables[seq, positions // self.page_size]
        slots = pages * self.page_size + positions % self.page_size
        batch = PagedBatch(qlens, starts + qlens, tables, slots)
        rows = (local >= logits_from[seq]).nonzero().squeeze(1)
        return batch, positions, rows

    @torch.inference_mode()
    def forward(self, seqs: list[BatchSeq]) -> ForwardResult:
        batch, positions, rows = self._batch(seqs)
        dev = self.device
        ids = torch.tensor([t for s in seqs for t in s.token_ids], device=dev)
        ctx = self.backend.context(self.kv_cache, batch)
        out = self.model(ids, positions.to(dev), ctx, self.capture)
        logits = self.model.compute_logits(out.hidden[rows.to(dev)])
        counts = (batch.query_lens - torch.tensor([s.logits_from for s in seqs])).tolist()
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
