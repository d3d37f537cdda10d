"""Attention: how a layer's queries meet keys and values, and where K/V live.

A model layer computes q, k, v for the N tokens of a flattened batch and calls
`ctx.attend(layer_idx, q, k, v)`. The context decides where K/V live (a paged cache for
serving, nothing for training) and which keys each query may see. An `AttentionBackend`
(`--attention-backend`) allocates the paged cache and makes one context per forward, so a
FlashInfer or FlashAttention backend can replace the pure PyTorch one without touching models.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class AttentionContext(abc.ABC):
    """Contract: `attend(layer_idx, q [N, h, d], k [N, kv, d], v [N, kv, d]) -> [N, h, d]`.

    N is the number of tokens in this forward, flattened over sequences in the order the
    context was built with; h is a multiple of kv (grouped-query attention). Query j of a
    sequence that has L keys after this forward and Q new tokens sees keys 0 .. L - Q + j.
    """

    @abc.abstractmethod
    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


class CausalAttention(AttentionContext):
    """No cache: N = batch * seq_len tokens of equal-length sequences, causal (training, tests)."""

    def __init__(self, batch: int, seq_len: int) -> None:
        self.batch, self.seq_len = batch, seq_len

    def attend(self, layer_idx, q, k, v):
        b, t = self.batch, self.seq_len
        q, k, v = (x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(b * t, out.shape[1], out.shape[3])


@dataclass(frozen=True)
class PagedBatch:
    """Where the tokens of one forward sit in the paged cache; built once per step.

    B sequences, N = sum(query_lens) new tokens. Sequence i's new tokens are the last
    `query_lens[i]` of its `kv_lens[i]` tokens; token t of a sequence lives in page
    `block_tables[i, t // page_size]` at offset `t % page_size`.
    """

    query_lens: torch.Tensor  # [B] int64, CPU
    kv_lens: torch.Tensor  # [B] int64, CPU: cached + new tokens
    block_tables: torch.Tensor  # [B, max_pages] int64, CPU, padded with page 0
    slot_mapping: torch.Tensor  # [N] int64: page * page_size + offset of each new token


class AttentionBackend(abc.ABC):
    """Owns the KV-cache layout and builds the `AttentionContext` of each forward.

    `allocate` returns one cache tensor per layer (its shape is the backend's business);
    `context(cache, batch)` returns a context whose `attend` writes the new K/V of `batch`
    into `cache[layer_idx]` and attends over each sequence's pages. `uses_kernels`: the model
    should switch to the C++ kernels' weight layout (`CausalLM.use_kernels`).
    """

    uses_kernels = False

    @abc.abstractmethod
    def allocate(
        self,
        num_layers: int,
        num_blocks: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str,
    ) -> list[torch.Tensor]: ...

    @abc.abstractmethod
    def context(self, cache: list[torch.Tensor], batch: PagedBatch) -> AttentionContext: ...


class TorchBackend(AttentionBackend):
    """Pure PyTorch (any device). Per layer one tensor [2, kv, num_blocks, page_size, d]:
    K and V, head-major, so that gathering a sequence's pages yields [kv, L, d] contiguous
    keys per head in one `index_select`, the unit of gathering being a page."""

    def allocate(self, num_layers, num_blocks, page_size, num_kv_heads, head_dim, dtype, device):
        shape = (2, num_kv_heads, num_blocks, page_size, head_dim)
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def context(self, cache, batch):
        return PagedAttention(cache, batch)


class CppBackend(TorchBackend):
    """A compiled CPU kernel (`specserve/kernels`) attends every query (decode steps, verify
    windows, prefill chunks) over the pages in place with an online softmax: no gather, no
    mask. The cache has `TorchBackend`'s shape, but each key page is stored transposed,
    [head_dim, page_size], so that the kernel scores 16 keys with one vector product per
    element of the head (`keys_transposed` / `keys_untransposed` convert between the two)."""

    uses_kernels = True

    def __init__(self) -> None:
        from specserve import kernels

        kernels.load()

    def allocate(self, num_layers, num_blocks, page_size, num_kv_heads, head_dim, dtype, device):
        if torch.device(device).type != "cpu":
            raise ValueError("--attention-backend cpp runs on the CPU only; use torch on GPUs")
        return super().allocate(
            num_layers, num_blocks, page_size, num_kv_heads, head_dim, dtype, device
        )

    def context(self, cache, batch):
        return KernelPagedAttention(cache, batch)


def keys_transposed(cache: torch.Tensor) -> torch.Tensor:
    """A `TorchBackend` cache [2, kv, blocks, page, d] in `CppBackend`'s layout (a copy)."""
    two, kv, blocks, page, d = cache.shape
    out = cache.clone()
    out[0].view(kv, blocks, d, page).copy_(cache[0].transpose(-1, -2))
    return out


def keys_untransposed(cache: torch.Tensor) -> torch.Tensor:
    """A `CppBackend` cache in `TorchBackend`'s layout (a copy): `keys_transposed` undone."""
    two, kv, blocks, page, d = cache.shape
    out = cache.clone()
    out[0].copy_(cache[0].reshape(kv, blocks, d, page).transpose(-1, -2))
    return out


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchBackend, "cpp": CppBackend}


def make_attention_backend(name: str) -> AttentionBackend:
    """The backend named by `--attention-backend`."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {sorted(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]()


@dataclass
class _Group:
    """Sequences attended in one SDPA call, padded to the longest query and key lengths."""

    shape: tuple[int, int]  # (G, Qmax)
    rows: torch.Tensor | None  # [G, Qmax] rows of the flattened batch (N = a zero pad row);
    #                            None: the group is the whole batch in order, no padding
    pages: torch.Tensor | None  # [2 * kv * G * pages] rows of the cache viewed [-1, P * d];
    #                             None: no cached prefix, attend over the new k, v directly
    num_keys: int  # Lmax
    first_row: int  # with `pages` None: the sequence's first row in the batch
    mask: torch.Tensor | None  # [G, 1, Qmax, Lmax] True = may attend; None: every key visible
    out_index: torch.Tensor | None  # [valid] real positions of the flat [G * Qmax] output;
    #                                 None: no query is padding
    out_rows: torch.Tensor  # [valid] matching rows of the batch


class PagedAttention(AttentionContext):
    """Paged attention in pure PyTorch over `TorchBackend`'s cache layout.

    New K/V go to their slots with one `index_copy_` per layer. Short queries (decode steps,
    verify windows of up to `SHORT_QUERY` tokens) are bucketed by key length so that padding
    stays under `1 / BUCKET_FILL - 1` of the keys read (the only mask is over that padding and
    the window's causal corner, built once per forward) and the gathered pages of a bucket
    (`GROUP_BYTES`) are still in cache when SDPA reads them; each bucket gathers its pages with
    one `index_select` and runs one SDPA call. A long query (a prefill chunk) is its own group:
    with no cached prefix it attends over its own k, v (causal, nothing gathered), after a
    prefix hit it gathers the prefix pages the same way.
    """

    SHORT_QUERY = 16
    BUCKET_FILL = 0.8  # a bucket admits a sequence with at least this fraction of its keys
    GROUP_BYTES = 4 << 20  # gathered K/V per SDPA call: read back from cache, not memory

    def __init__(self, cache: list[torch.Tensor], batch: PagedBatch) -> None:
        self.cache = cache
        self.num_tokens = int(batch.query_lens.sum())
        device = cache[0].device
        self._prepare_write(batch)
        self.groups = [self._group(batch, idx, device) for idx in self._plan(batch)]
        self.padded = any(g.out_index is not None for g in self.groups)

    def _plan(self, batch: PagedBatch) -> list[torch.Tensor]:
        """Sequence indices per group: short queries bucketed by key length, long ones alone."""
        qlens, klens = batch.query_lens.tolist(), batch.kv_lens.tolist()
        short = sorted((i for i, q in enumerate(qlens) if q <= self.SHORT_QUERY),
                       key=lambda i: -klens[i])  # fmt: skip
        two, kv, _, _, d = self.cache[0].shape
        per_key = two * kv * d * self.cache[0].element_size()
        buckets: list[list[int]] = []
        for i in short:
            if buckets and (
                klens[i] >= self.BUCKET_FILL * klens[buckets[-1][0]]
                and (len(buckets[-1]) + 1) * klens[buckets[-1][0]] * per_key <= self.GROUP_BYTES
            ):
                buckets[-1].append(i)
            else:
                buckets.append([i])
        long = [[i] for i, q in enumerate(qlens) if q > self.SHORT_QUERY]
        return [torch.tensor(g) for g in [sorted(b) for b in buckets] + long]

    def _group(self, batch: PagedBatch, idx: torch.Tensor, device) -> _Group:
        two, kv, num_blocks, page, _ = self.cache[0].shape
        qlens, klens = batch.query_lens[idx], batch.kv_lens[idx]
        g, qmax, lmax = len(idx), int(qlens.max()), int(klens.max())
        starts = torch.cumsum(batch.query_lens, 0)[idx] - qlens
        ar_q = torch.arange(qmax)
        valid = ar_q[None, :] < qlens[:, None]  # [G, Qmax]
        rows = torch.where(valid, starts[:, None] + ar_q[None, :], self.num_tokens)
        whole = g == len(batch.query_lens) and bool((qlens == qmax).all())
        mask = pages = None
        if not (g == 1 and qmax == lmax):  # else a prefill chunk with no cached prefix
            tables = batch.block_tables[idx, : -(-lmax // page)]  # [G, pages]
            heads = torch.arange(two * kv)[:, None, None] * num_blocks
            pages = (heads + tables[None]).reshape(-1).to(device)
            # key l visible to query j iff l <= (L - Q) + j and l < L
            ar_l = torch.arange(lmax)
            limit = torch.minimum((klens - qlens)[:, None] + ar_q[None, :], klens[:, None] - 1)
            seen = ar_l[None, None, :] <= limit[:, :, None]  # [G, Qmax, Lmax]
            mask = None if bool(seen.all()) else seen.unsqueeze(1).to(device)
        flat_valid = valid.reshape(-1)
        return _Group(
            shape=(g, qmax),
            rows=None if whole else rows.to(device),
            pages=pages,
            num_keys=lmax,
            first_row=int(starts[0]),
            mask=mask,
            out_index=None if bool(valid.all()) else flat_valid.nonzero().squeeze(1).to(device),
            out_rows=rows.reshape(-1)[flat_valid].to(device),
        )

    def attend(self, layer_idx, q, k, v):
        cache = self.cache[layer_idx]
        self._write(cache, k, v)
        if self.groups[0].rows is None:  # one group, the whole batch: plain reshapes
            grp = self.groups[0]
            qg = q.view(*grp.shape, *q.shape[1:])
            return self._attend_group(grp, qg, k, v, cache).view(q.shape)
        out = q.new_empty(q.shape)
        self._attend_groups(q, k, v, cache, out)
        return out

    def _prepare_write(self, batch: PagedBatch) -> None:
        """One write index into the cache viewed [2 * kv * num_blocks * page, d]."""
        two, kv, num_blocks, page, _ = self.cache[0].shape
        device = self.cache[0].device
        heads = torch.arange(two * kv, device=device)[:, None] * (num_blocks * page)
        self.write_rows = (heads + batch.slot_mapping.to(device)[None, :]).reshape(-1)

    def _write(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The new tokens' K/V into their slots: one `index_copy_`."""
        d = cache.shape[-1]
        new = torch.stack([k, v]).transpose(1, 2)  # [2, kv, N, d]
        if new.dtype != cache.dtype:
            new = new.to(cache.dtype)
        cache.view(-1, d).index_copy_(0, self.write_rows, new.reshape(-1, d))

    def _attend_groups(self, q, k, v, cache, out) -> None:
        h, d = q.shape[1:]
        q_pad = torch.cat([q, q.new_zeros(1, h, d)]) if self.padded else q
        for grp in self.groups:
            if grp.rows is None:  # the whole batch, in order
                out.copy_(
                    self._attend_group(grp, q.view(*grp.shape, h, d), k, v, cache).view(q.shape)
                )
                continue
            qg = q_pad.index_select(0, grp.rows.view(-1)).view(*grp.shape, h, d)
            o = self._attend_group(grp, qg, k, v, cache).reshape(-1, h, d)
            if grp.out_index is None:
                out.index_copy_(0, grp.out_rows, o)
            else:
                out[grp.out_rows] = o[grp.out_index]

    @staticmethod
    def _attend_group(grp: _Group, qg, k, v, cache) -> torch.Tensor:
        """qg [G, Qmax, h, d] -> [G, Qmax, h, d] over the group's keys and values."""
        two, kv, _, page, d = cache.shape
        if grp.pages is None:  # a prefill chunk with no cached prefix: its own k, v
            n = grp.shape[1]
            own = (x.narrow(0, grp.first_row, n).view(1, n, kv, d) for x in (k, v))
            keys, values = (x.transpose(1, 2) for x in own)
            if cache.dtype != k.dtype:  # as the cache holds them (`--kv-cache-dtype`), so that
                # a token's K/V read the same here as from the cache in later steps
                keys, values = (x.to(cache.dtype).to(k.dtype) for x in (keys, values))
            causal = True
        else:
            g, lmax = grp.shape[0], grp.num_keys
            kvg = cache.view(-1, page * d).index_select(0, grp.pages)
            kvg = kvg.view(two, kv, g, -1, d)[:, :, :, :lmax]
            if kvg.dtype != qg.dtype:
                kvg = kvg.to(qg.dtype)
            keys, values = kvg[0].transpose(0, 1), kvg[1].transpose(0, 1)  # [G, kv, L, d]
            causal = False
        o = F.scaled_dot_product_attention(
            qg.transpose(1, 2),
            keys,
            values,
            attn_mask=grp.mask,
            is_causal=causal,
            enable_gqa=True,
        )
        return o.transpose(1, 2)


class KernelPagedAttention(PagedAttention):
    """`CppBackend`'s context: the whole batch (decode steps, verify windows and prefill chunks,
    causal over each query's own new rows) in one kernel call per layer over the pages in place.
    A long query is split into blocks of queries so that threads share it."""

    def __init__(self, cache: list[torch.Tensor], batch: PagedBatch) -> None:
        starts = torch.cumsum(batch.query_lens, 0) - batch.query_lens
        self.kernel_args = tuple(
            x.contiguous() for x in (batch.block_tables, starts, batch.query_lens, batch.kv_lens)
        )
        super().__init__(cache, batch)
        # for `dense_layers` (any step, prefill chunks too; a float32 model over any cache dtype)
        self.step_args = (cache, self.slots, *self.kernel_args)

    def _plan(self, batch: PagedBatch) -> list[torch.Tensor]:
        return []  # no SDPA groups: the kernel takes every query

    def _prepare_write(self, batch: PagedBatch) -> None:
        self.slots = batch.slot_mapping.to("cpu", torch.long).contiguous()  # for `store_kv`

    def _write(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The new tokens' K/V into their slots, keys transposed into their pages (float32 K/V
        are rounded to a 16-bit cache by the kernel)."""
        if k.dtype not in (cache.dtype, torch.float32):
            k, v = k.float(), v.float()
        torch.ops.specserve.store_kv(cache, k.contiguous(), v.contiguous(), self.slots)

    def attend(self, layer_idx, q, k, v):
        cache = self.cache[layer_idx]
        self._write(cache, k, v)
        dtype = q.dtype
        if dtype not in (cache.dtype, torch.float32):  # a 16-bit model, a cache of another type
            q = q.float()
        out = q.new_empty(q.shape)
        scale = q.shape[-1] ** -0.5
        torch.ops.specserve.paged_attention(out, q.contiguous(), cache, *self.kernel_args, scale)
        return out if out.dtype == dtype else out.to(dtype)
