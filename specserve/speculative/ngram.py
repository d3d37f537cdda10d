"""Prompt lookup (n-gram) drafting: continue the text the way it continued before.

The longest suffix of prompt + output, of n = max_ngram .. min_ngram tokens, that occurred
earlier in the same sequence is looked up (the most recent earlier occurrence wins), and the
tokens that followed it are proposed. Deterministic, so proposals carry no probabilities
(verification treats them as one-hot) and no confidences.
"""

from __future__ import annotations

from specserve.core import Request
from specserve.speculative.base import Drafter, DraftProposal


def lookup(tokens: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix."""
    size = len(tokens)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        suffix = tokens[size - n :]
        last = suffix[-1]
        # scan candidate end positions right to left, excluding the suffix itself
        for end in range(size - 2, n - 2, -1):
            if tokens[end] == last and tokens[end - n + 1 : end + 1] == suffix:
                return tokens[end + 1 : end + 1 + k]
    return []


class NgramDrafter(Drafter):
    def __init__(self, num_draft_tokens: int, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if num_draft_tokens < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError("n-gram drafter: need num_draft_tokens >= 1, 1 <= min <= max n")
        self.k, self.max_ngram, self.min_ngram = num_draft_tokens, max_ngram, min_ngram

    @property
    def max_draft_tokens(self) -> int:
        return self.k

    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[DraftProposal]:
        return [
            DraftProposal(
                lookup(r.all_token_ids, min(self.k, m), self.max_ngram, self.min_ngram)
                if m > 0
                else []
            )
            for r, m in zip(requests, max_tokens, strict=True)
        ]
