"""From logits to the distribution a request samples from, and sampling with per-request seeds.

Order of processing (as in vLLM): penalties on raw logits, temperature, then min-p, top-k and
top-p filtering on the resulting probabilities. Greedy requests take the argmax of the penalised
logits. `target_probs` is also what speculative verification compares draft probabilities with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specserve.core import SamplingParams


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """logits [M, V]; per row, the prompt tokens and the output tokens generated before it."""
    logits = logits.clone()
    for row, p in enumerate(params):
        if not p.has_penalties:
            continue
        out = torch.tensor(output_ids[row], dtype=torch.long, device=logits.device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(list(prompt_ids[row]), dtype=torch.long, device=logits.device)
            seen = torch.cat([seen, out]).unique()
            vals = logits[row, seen]
            logits[row, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if out.numel() and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """logits [M, V] of one request + its OpenAI logit_bias on every row (a new tensor)."""
    ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=logits.device)
    add = torch.tensor([b for _, b in bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(1, ids, add.expand(logits.shape[0], -1))


def probs_from_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [M, V] (penalised) -> probabilities [M, V] after temperature, min-p, top-k, top-p.
    Greedy rows become one-hot on the argmax."""
    device = logits.device
    greedy = torch.tensor([p.greedy for p in params], device=device)
    temp = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)
    probs = torch.softmax(logits / temp[:, None], dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
        top = probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < min_p[:, None] * top, 0.0)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        probs = _top_k_top_p(probs, params)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    if greedy.any():
        onehot = torch.zeros_like(probs)
        onehot.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def _top_k_top_p(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    vocab = probs.shape[1]
    # top_k beyond the vocabulary keeps everything (and would overflow an int64 tensor)
    k = torch.tensor(
        [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=probs.device
    )
    top_p = torch.tensor([p.top_p for p in params], device=probs.device)
    rank = torch.arange(vocab, device=probs.device)[None, :]
    # keep a token while the mass strictly before it is below top_p (the first always stays)
    before = sorted_p.cumsum(dim=-1) - sorted_p
    keep = (rank < k[:, None]) & (before < top_p[:, None])
    sorted_p = sorted_p * keep
    return torch.zeros_like(probs).scatter_(1, idx, sorted_p)


def sample(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of probs [M, V]; row i uses generators[i] (None: the global RNG).
    Rows on the global RNG are drawn in one call. A seeded row takes one uniform from its own
    generator, and all seeded rows are drawn together by inverse CDF (the first token whose
    cumulative probability, in float64, exceeds u times the row's total): a `torch.rand(1)`
    per row costs a few microseconds where a `torch.multinomial` per row cost about 50."""
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if not seeded:
        return torch.multinomial(probs, 1)[:, 0]
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    free = [i for i, g in enumerate(generators) if g is None]
    if free:
        out[free] = torch.multinomial(probs[free], 1)[:, 0]
    gens = [g for g in generators if g is not None]  # the seeded rows' generators, in order
    u = torch.cat([torch.rand(1, dtype=torch.float64, generator=g, device=g.device) for g in gens])
    u = u.to(probs.device)
    cdf = probs[seeded].double().cumsum(dim=-1)
    # zero-probability tokens never win: the first index with cdf > u * total
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    out[seeded] = pick.clamp_(max=probs.shape[1] - 1)
    return out


def top_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, k: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Raw-model logprob of each chosen token and the k most likely alternatives (OpenAI style)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
    if k > 0:
        vals, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tops = [
            list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)
        ]
    else:
        tops = [[] for _ in chosen]
    return list(zip(chosen, tops, strict=True))
