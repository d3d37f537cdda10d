"""Drawing draft tokens from draft logits, one position for a batch of requests.

Greedy requests take the argmax (a deterministic proposal, so no q is needed). Sampled requests
draw from q = the request's own sampling transform of the draft logits (temperature, top-k,
top-p, min-p), and q is reported exactly, which is all rejection sampling needs to stay lossless.
The confidence proxy max_v q(v) depends only on the earlier tokens, never on the drawn one, so a
verify-length planner may read it without biasing the output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from specserve.core import Request
from specserve.engine.sampler import probs_from_logits, sample

#: how a drafting loop chooses each position's token: logits [..., V] -> (tokens [...], any
#: per-token outputs...); `draw` in serving, argmax or a seeded sample in offline evaluation
Pick = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def draw(
    logits: torch.Tensor, requests: list[Request]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [R, V] -> (tokens [R] long, q [R, V], confidence proxy [R]).

    q is one-hot on the argmax for greedy requests; when every request is greedy nobody reads
    q (`proposal_probs`), so it comes back empty [R, 0] and only the argmax is computed."""
    logits = logits.float()
    if all(r.params.greedy for r in requests):
        return logits.argmax(dim=-1), logits.new_empty(logits.shape[0], 0), _top_prob(logits)
    q = probs_from_logits(logits, [r.params for r in requests])
    greedy = torch.tensor([r.params.greedy for r in requests], device=logits.device)
    drawn = sample(q, [r.generator for r in requests])  # some request samples
    tokens = torch.where(greedy, logits.argmax(dim=-1), drawn)
    conf = torch.where(greedy, _top_prob(logits), q.max(dim=-1).values)
    return tokens, q, conf


def _top_prob(logits: torch.Tensor) -> torch.Tensor:
    """max_v softmax(logits)_v per row: a greedy request's confidence proxy."""
    return torch.softmax(logits, dim=-1).max(dim=-1).values


def proposal_probs(q: torch.Tensor, request: Request) -> torch.Tensor | None:
    """q [K, V] of one request -> what its DraftProposal carries (None when greedy)."""
    return None if request.params.greedy else q
