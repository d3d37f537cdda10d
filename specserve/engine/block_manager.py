"""Paged KV-cache bookkeeping: blocks, reference counts, a free list and a prefix cache.

A block holds `page_size` consecutive tokens of one sequence. A full block whose tokens are
committed gets a chained hash (of its tokens and the previous block's hash), so a request with
the same prefix can share it (reference count > 1). Freed blocks keep their hash until they are
reused, so the free list doubles as an LRU cache of prefixes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from specserve.core import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        self.page_size = page_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chained hash -> block id
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """Blocks to add so that `request` can hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.page_size) - len(request.block_table))

    def slot(self, request: Request, position: int) -> int:
        block = request.block_table[position // self.page_size]
        return block * self.page_size + position % self.page_size

    # -- allocation ----------------------------------------------------------------------
    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.tokens, block.ref_count = None, (), 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def match_prefix(self, request: Request) -> int:
        """Attach cached blocks for the longest cached prefix of the request's tokens.

        Called once when a request (re)starts with an empty block table. At least the last
        token is always left to compute, since its logits are needed. Returns tokens reused.
        """
        assert not request.block_table
        tokens = request.all_token_ids
        self.prefix_query_tokens += len(tokens)
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return 0  # prompt logprobs need every prompt token's logits
        usable = (len(tokens) - 1) // self.page_size
        prev = None
        for i in range(usable):
            chunk = tuple(tokens[i * self.page_size : (i + 1) * self.page_size])
            h = hash((prev, chunk))
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].tokens != chunk:
                break
            self._ref(block_id)
            request.block_table.append(block_id)
            prev = h
        request.num_hashed_blocks = len(request.block_table)
        hit = len(request.block_table) * self.page_size
        self.prefix_hit_tokens += hit
        return hit

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Grow the request's block table to hold `num_tokens` tokens; False if out of blocks."""
        need = self.blocks_needed(request, num_tokens)
        if need > len(self.free):
            return False
        request.block_table.extend(self._take_free() for _ in range(need))
        return True

    def commit(self, request: Request, num_tokens: int) -> None:
        """Tokens [0, num_tokens) have final KV: publish their full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        tokens = request.all_token_ids
        start = request.num_hashed_blocks
        prev = self.blocks[request.block_table[start - 1]].hash if start else None
        for i in range(start, min(num_tokens, len(tokens)) // self.page_size):
            block = self.blocks[request.block_table[i]]
            if block.hash is None:
                chunk = tuple(tokens[i * self.page_size : (i + 1) * self.page_size])
                block.hash, block.tokens = hash((prev, chunk)), chunk
                self.cached.setdefault(block.hash, block.block_id)
            prev = block.hash
            request.num_hashed_blocks = i + 1

    def rollback(self, request: Request, num_tokens: int) -> None:
        """Keep blocks for the first `num_tokens` tokens only; release the rest (rejected drafts)."""
        keep = -(-num_tokens // self.page_size)
        assert keep >= request.num_hashed_blocks, "rollback into committed KV"
        while len(request.block_table) > keep:
            self._release(request.block_table.pop())

    def flush_prefix_cache(self) -> bool:
        """Forget every cached prefix (SGLang's /flush_cache); only while no block is in use."""
        if len(self.free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.hash, block.tokens = None, ()
        self.cached.clear()
        return True

    def free_request(self, request: Request) -> None:
        for block_id in reversed(request.block_table):
            self._release(block_id)
        request.block_table.clear()
        request.num_hashed_blocks = 0

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released twice"
        if block.ref_count == 0:
            # hashed blocks go to the back (reused last), unhashed ones to the front
            self.free[block_id] = None
            if block.hash is None:
                self.free.move_to_end(block_id, last=False)
