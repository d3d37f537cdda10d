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


def hidden_bytes_per_token(
    model_cfg: ModelConfig, capture: tuple[int, ...], dtype: torch.dtype
) -> int:
    """Hidden-pool bytes one more cached token costs when a drafter reads the target layers
    `capture` and prefix caching is on: their hidden states, in the model dtype."""
    return len(capture) * model_cfg.hidden_size * torch.finfo(dtype).bits // 8


def blocks_with_hidden_pool(
    num_blocks: int, cache: CacheConfig, kv_bytes: int, hidden_bytes: int
) -> int:
    """The block count once a hidden pool shares the cache: sized from memory, the K/V and the
    pool together fit the bytes `num_blocks` blocks of K/V had; an explicit --num-blocks or
    --max-total-tokens is kept (the pool then costs `hidden_bytes` more per token)."""
    if cache.num_blocks is not None or cache.max_total_tokens is not None:
        return num_blocks
    return max(4, num_blocks * kv_bytes // (kv_bytes + hidden_bytes))


def num_kv_blocks(model_cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    """Blocks from --num-blocks or --max-total-tokens, else a fraction of free memory."""
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
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """`dtype`: the model's (and the hidden pool's); `kv_dtype`: the K/V cache's
        (`--kv-cache-dtype`; None: the model's)."""
        self.model, self.page_size, self.device, self.capture = model, page_size, device, capture
        self.dtype, self.kv_dtype = dtype, kv_dtype or dtype
        self.backend = make_attention_backend(attention_backend)
        if self.backend.uses_kernels and hasattr(model, "use_kernels"):
            model.use_kernels()
        self.allocate(num_blocks)

    def allocate(self, num_blocks: int, hidden_width: int = 0) -> None:
        """(Re)allocate the KV cache for `num_blocks` blocks and, when `hidden_width` > 0, the
        hidden pool [num_blocks, page_size, hidden_width]: the captured hidden states of every
        cached token, written with the K/V, so a prefix hit can hand them to the drafter."""
        self.kv_cache = []  # release the old cache before allocating the new one
        kv_heads, head_dim = self.model.kv_head_shape()  # this rank's KV heads under TP
        self.kv_cache = self.backend.allocate(
            self.model.config.num_hidden_layers,
            num_blocks,
            self.page_size,
            kv_heads,
            head_dim,
            self.kv_dtype,
            self.device,
        )
        shape = (num_blocks, self.page_size, hidden_width)
        self.hidden_pool = (
            torch.zeros(shape, dtype=self.dtype, device=self.device) if hidden_width else None
        )

    def cached_hidden(self, block_ids: list[int]) -> torch.Tensor:
        """The pooled hidden states of whole blocks, in order: [len(block_ids) * page_size, W]."""
        assert self.hidden_pool is not None, "no hidden pool (allocate with hidden_width > 0)"
        pages = torch.tensor(block_ids, device=self.hidden_pool.device)
        return self.hidden_pool[pages].flatten(0, 1)

    def _batch(self, seqs: list[BatchSeq]) -> tuple[PagedBatch, torch.Tensor, torch.Tensor]:
        """The step's cache layout, token positions and logits rows, built on Python ints (a
        decode step has a few dozen of each) and made tensors once."""
        page = self.page_size
        positions: list[int] = []
        slots: list[int] = []
        rows: list[int] = []
        for s in seqs:
            first, table = len(positions), s.block_table
            span = range(s.start_position, s.start_position + len(s.token_ids))
            positions.extend(span)
            slots.extend(table[p // page] * page + p % page for p in span)
            rows.extend(range(first + s.logits_from, len(positions)))
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])
        qlens = torch.tensor([len(s.token_ids) for s in seqs])
        ends = torch.tensor([s.start_position + len(s.token_ids) for s in seqs])
        batch = PagedBatch(qlens, ends, tables, torch.tensor(slots, dtype=torch.long))
        return (
            batch,
            torch.tensor(positions, dtype=torch.long),
            torch.tensor(rows, dtype=torch.long),
        )

    @torch.inference_mode()
    def forward(self, seqs: list[BatchSeq]) -> ForwardResult:
        batch, positions, rows = self._batch(seqs)
        dev = self.device
        ids = torch.tensor([t for s in seqs for t in s.token_ids], device=dev)
        ctx = self.backend.context(self.kv_cache, batch)
        out = self.model(ids, positions.to(dev), ctx, self.capture)
        if self.hidden_pool is not None and out.captured is not None:
            pool = self.hidden_pool.view(-1, self.hidden_pool.shape[-1])
            pool[batch.slot_mapping.to(dev)] = out.captured.to(pool.dtype)
        logits = self.model.compute_logits(out.hidden[rows.to(dev)])
        counts = [len(s.token_ids) - s.logits_from for s in seqs]
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
