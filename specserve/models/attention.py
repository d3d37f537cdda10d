"""Attention backends: how a layer's queries meet keys and values.

A model layer computes q, k, v for the N tokens of a flattened batch and calls
`ctx.attend(layer_idx, q, k, v)`. The context decides where K/V live (a paged cache for
serving, nothing for training) and which keys each query may see.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class AttentionContext(abc.ABC):
    """Contract: `attend(layer_idx, q [N, h, d], k [N, kv, d], v [N, kv, d]) -> [N, h, d]`.

    N is the number of tokens in this forward, flattened over sequences in the order the
    context was built with; h is a multiple of kv (grouped-query attention).
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


@dataclass
class _Group:
    """Sequences attended together, padded to the longest query and key lengths."""

    q_index: torch.Tensor  # [G, Qmax] rows of the flattened batch (N = a zero pad row)
    kv_slots: torch.Tensor  # [G, Lmax] cache slots (padding points at slot 0, masked out)
    mask: torch.Tensor | None  # [G, 1, Qmax, Lmax] True = may attend
    causal: bool  # with mask None: causal (prefill without prefix) or not (a single query)
    out_index: torch.Tensor  # [valid] positions in the flattened [G*Qmax] output that are real
    out_rows: torch.Tensor  # [valid] matching rows of the batch
    whole: bool = False  # the group is the whole batch with no padding: plain reshapes


class PagedAttention(AttentionContext):
    """K/V in a paged cache: one flat tensor per layer of shape [num_slots, kv, d].

    Slot s belongs to block s // page_size. Each sequence i has `query_lens[i]` new tokens whose
    K/V go to `slot_mapping`, and sees `kv_slots[i]` (its whole history, new tokens last),
    causally: query j of a sequence with L keys and Q queries sees keys < L - Q + j + 1.
    Short queries (decode, verify windows) are padded into one group; each long query
    (a prefill chunk) is its own group.
    """

    SHORT_QUERY = 16

    def __init__(
        self,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        slot_mapping: torch.Tensor,
        query_lens: list[int],
        kv_slots: list[torch.Tensor],
    ) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache
        self.slot_mapping = slot_mapping
        self.num_tokens = sum(query_lens)
        device = slot_mapping.device
        starts, pos = [], 0
        for q in query_lens:
            starts.append(pos)
            pos += q
        short = [i for i, q in enumerate(query_lens) if q <= self.SHORT_QUERY]
        long = [i for i, q in enumerate(query_lens) if q > self.SHORT_QUERY]
        members = ([short] if short else []) + [[i] for i in long]
        self.groups = [
            self._group(
                [starts[i] for i in m], [query_lens[i] for i in m], [kv_slots[i] for i in m], device
            )
            for m in members
        ]

    def _group(self, starts, qlens, slots, device) -> _Group:
        g, qmax = len(qlens), max(qlens)
        lens = [len(s) for s in slots]
        lmax = max(lens)
        ar_q = torch.arange(qmax, device=device)
        ar_l = torch.arange(lmax, device=device)
        st = torch.tensor(starts, device=device)
        ql = torch.tensor(qlens, device=device)
        kl = torch.tensor(lens, device=device)
        valid_q = ar_q[None, :] < ql[:, None]  # [G, Qmax]
        q_index = torch.where(valid_q, st[:, None] + ar_q[None, :], self.num_tokens)
        kv = torch.zeros(g, lmax, dtype=torch.long, device=device)
        for i, s in enumerate(slots):
            kv[i, : len(s)] = s
        if g == 1 and (qlens[0] == lens[0] or qlens[0] == 1):
            mask = None  # plain causal (no cached prefix) or one query that sees every key
        else:
            # key l visible to query j iff l <= (L - Q) + j and l < L
            limit = (kl - ql)[:, None] + ar_q[None, :]  # [G, Qmax]
            mask = ar_l[None, None, :] <= limit[:, :, None]
            mask &= ar_l[None, None, :] < kl[:, None, None]
            mask[~valid_q] = False
            mask[..., 0] |= ~valid_q  # padded queries look at slot 0 to avoid NaN rows
            mask = mask.unsqueeze(1)
        flat_valid = valid_q.reshape(-1)
        whole = sum(qlens) == self.num_tokens and all(q == qmax for q in qlens)
        return _Group(
            whole=whole,
            q_index=q_index,
            kv_slots=kv,
            mask=mask,
            causal=mask is None and qmax > 1,
            out_index=flat_valid.nonzero().squeeze(1),
            out_rows=q_index.reshape(-1)[flat_valid],
        )

    def attend(self, layer_idx, q, k, v):
        kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
        kc.index_copy_(0, self.slot_mapping, k.to(kc.dtype))
        vc.index_copy_(0, self.slot_mapping, v.to(vc.dtype))
        h, d = q.shape[1], q.shape[2]
        if len(self.groups) == 1 and self.groups[0].whole:  # e.g. a decode batch
            grp = self.groups[0]
            return self._attend_group(grp, q.view(*grp.q_index.shape, h, d), kc, vc).view(-1, h, d)
        q_pad = torch.cat([q, q.new_zeros(1, h, d)])
        out = q.new_empty(q.shape)
        for grp in self.groups:
            o = self._attend_group(grp, q_pad[grp.q_index], kc, vc).reshape(-1, h, d)
            out[grp.out_rows] = o[grp.out_index]
        return out

    @staticmethod
    def _attend_group(grp: _Group, qg: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor):
        """qg [G, Qmax, h, d] -> [G, Qmax, h, d] over the group's cached keys and values."""
        kg, vg = kc[grp.kv_slots], vc[grp.kv_slots]  # [G, Lmax, kv, d]
        if kg.dtype != qg.dtype:
            kg, vg = kg.to(qg.dtype), vg.to(qg.dtype)
        o = F.scaled_dot_product_attention(
            qg.transpose(1, 2),
            kg.transpose(1, 2),
            vg.transpose(1, 2),
            attn_mask=grp.mask,
            is_causal=grp.causal,
            enable_gqa=True,
        )
        return o.transpose(1, 2)
