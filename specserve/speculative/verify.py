"""Verification of a speculative draft block against one target forward pass.

Shapes: R requests, K = the longest verify window in the batch, V vocabulary. Draft tokens are
right-padded; `draft_lens[r] <= K` tokens of request r are in its verify window. The target
gives K+1 positions per request: position i scores draft token i, and position `draft_lens[r]`
gives the bonus token. Everything past a request's window is padding and is never read for its
value (padding may hold -1 tokens or NaN probabilities).

Both functions return `(out_tokens [R, K+1] long padded with -1, num_out [R] long)`: the
accepted draft prefix followed by one token from the target, so `num_out = accepted + 1`.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Below this residual mass a rejection had (numerically) zero probability; sample from p instead.
_RESIDUAL_EPS = 1e-6


def greedy_verify(
    draft_tokens: Tensor, draft_lens: Tensor, target_argmax: Tensor
) -> tuple[Tensor, Tensor]:
    """Accept the longest draft prefix that equals the target's argmax, then add its next token.

    draft_tokens [R, K] long, draft_lens [R] long, target_argmax [R, K+1] long.
    Returns (out_tokens [R, K+1] long padded with -1, num_out [R] long).
    """
    valid = _window_mask(draft_tokens, draft_lens)
    match = (draft_tokens == target_argmax[:, : draft_tokens.shape[1]]) & valid
    accepted = match.long().cumprod(dim=1).sum(dim=1)
    return _assemble(draft_tokens, accepted, target_argmax.gather(1, accepted[:, None])[:, 0])


def rejection_verify(
    draft_tokens: Tensor,
    draft_lens: Tensor,
    draft_probs: Tensor | None,
    target_probs: Tensor,
    generators: list[torch.Generator | None],
) -> tuple[Tensor, Tensor]:
    """Lossless speculative sampling (Leviathan et al. 2023, Chen et al. 2023).

    draft_tokens [R, K] long, draft_lens [R] long.
    draft_probs [R, K, V] float: the exact distribution q each draft token was sampled from;
        None means deterministic proposals (one-hot q, e.g. n-gram).
    target_probs [R, K+1, V] float: target distributions p after temperature / top-k / top-p.
    generators: R entries; generators[r] makes request r reproducible (None = global RNG).
        A seeded request consumes exactly draft_lens[r] + 1 uniforms, so its result does not
        depend on the other requests in the batch.

    Draft token x_i is accepted with probability min(1, p(x_i) / q(x_i)) (never if q(x_i) = 0).
    At the first rejection the output token is sampled from normalize(max(p - q, 0)) (from p
    when that mass is numerically zero); if all are accepted the bonus token is sampled from
    target_probs[r, draft_lens[r]].
    Returns (out_tokens [R, K+1] long padded with -1, num_out [R] long).
    """
    num_req, k = draft_tokens.shape
    if len(generators) != num_req:
        raise ValueError(f"need one generator entry per request: {len(generators)} != {num_req}")
    valid = _window_mask(draft_tokens, draft_lens)
    tokens = torch.where(valid, draft_tokens, 0)
    u_accept, u_sample = _uniforms(draft_lens, k, generators, target_probs.device)

    p_tok = target_probs[:, :k].gather(2, tokens[..., None])[..., 0].double()
    if draft_probs is None:
        q_tok = torch.ones_like(p_tok)
    else:
        q_tok = draft_probs.gather(2, tokens[..., None])[..., 0].double()
    # u < p/q written without the division; q(x) = 0 cannot have been sampled, so reject it.
    accept = (q_tok > 0) & (u_accept * q_tok < p_tok) & valid
    accepted = accept.long().cumprod(dim=1).sum(dim=1)

    rows = torch.arange(num_req, device=target_probs.device)
    p_next = target_probs[rows, accepted].double()
    rejected = accepted < draft_lens
    if k > 0:
        at = accepted.clamp(max=k - 1)
        if draft_probs is None:
            q_next = torch.nn.functional.one_hot(tokens[rows, at], p_next.shape[1]).double()
        else:
            q_next = draft_probs[rows, at].double()
        residual = (p_next - q_next).clamp(min=0)
        degenerate = residual.sum(dim=1, keepdim=True) <= _RESIDUAL_EPS
        dist = torch.where(rejected[:, None] & ~degenerate, residual, p_next)
    else:
        dist = p_next
    return _assemble(draft_tokens, accepted, _inverse_cdf(dist, u_sample))


def _window_mask(draft_tokens: Tensor, draft_lens: Tensor) -> Tensor:
    """[R, K] bool: True inside each request's verify window."""
    positions = torch.arange(draft_tokens.shape[1], device=draft_tokens.device)
    return positions[None, :] < draft_lens[:, None]


def _assemble(draft_tokens: Tensor, accepted: Tensor, next_token: Tensor) -> tuple[Tensor, Tensor]:
    """Accepted prefix of draft_tokens [R, K] + next_token [R] -> ([R, K+1] padded with -1, [R])."""
    num_req, k = draft_tokens.shape
    out = torch.full((num_req, k + 1), -1, dtype=torch.long, device=draft_tokens.device)
    keep = torch.arange(k, device=draft_tokens.device)[None, :] < accepted[:, None]
    out[:, :k] = torch.where(keep, draft_tokens, -1)
    out.scatter_(1, accepted[:, None], next_token[:, None].long())
    return out, accepted + 1


def _uniforms(
    draft_lens: Tensor, k: int, generators: list[torch.Generator | None], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Acceptance uniforms [R, K] (float64; padding holds 1.0) and sampling uniforms [R]."""
    num_req = draft_lens.shape[0]
    if all(g is None for g in generators):
        return (
            torch.rand(num_req, k, dtype=torch.float64, device=device),
            torch.rand(num_req, dtype=torch.float64, device=device),
        )
    u_accept = torch.ones(num_req, k, dtype=torch.float64, device=device)
    u_sample = torch.empty(num_req, dtype=torch.float64, device=device)
    for r, (n, gen) in enumerate(zip(draft_lens.tolist(), generators, strict=True)):
        gen_device = gen.device if gen is not None else device
        u = torch.rand(n + 1, dtype=torch.float64, generator=gen, device=gen_device).to(device)
        u_accept[r, :n] = u[:n]
        u_sample[r] = u[n]
    return u_accept, u_sample


def _inverse_cdf(dist: Tensor, u: Tensor) -> Tensor:
    """One token per row of dist [R, V] (non-negative, unnormalised) from uniforms u [R] -> [R]."""
    cdf = dist.cumsum(dim=1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    # u * total can round up to total; never return a zero-probability token because of it.
    vocab = torch.arange(dist.shape[1], device=dist.device)
    last_positive = torch.where(dist > 0, vocab, 0).amax(dim=1)
    return torch.minimum(index, last_positive)
