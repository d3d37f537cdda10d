"""Runs a model whose cache is per-request state (DeepSeek-V4) behind the `ModelRunner` interface.

The engine still allocates KV blocks (they bound how many tokens are admitted) and rolls them
back; the model's state follows the engine through `BatchSeq.start_position`: a forward that
starts before the tokens a state holds drops the rejected drafts first (`SequenceState.prepare`),
one that starts at 0 begins a fresh state. A request's state is keyed by its first block, which
no other live request holds (this model refuses prefix caching, so blocks are never shared).
A state is dropped once its request's block table (the list the engine passes in `BatchSeq`)
has been emptied by `BlockManager.free_request` (finished, aborted or preempted), or when its
key block shows up in another request's table.
"""

from __future__ import annotations

from typing import Any

import torch

from specserve.engine.model_runner import BatchSeq, ForwardResult


class StateRunner:
    def __init__(
        self,
        model: Any,  # a model with per-request state: new_state(), compute_logits()
        num_blocks: int,
        page_size: int,
        dtype: torch.dtype,
        device: str,
        capture: tuple[int, ...] = (),
        attention_backend: str = "torch",  # unused: attention runs inside the model's state
        kv_dtype: torch.dtype | None = None,  # unused: the state keeps the model's dtype
    ) -> None:
        self.model, self.device, self.capture = model, device, capture
        self.states: dict[int, tuple[object, list[int]]] = {}  # first block -> (state, table)

    def _state(self, seq: BatchSeq):
        for block in seq.block_table[1:]:  # blocks of finished requests, now reused
            self.states.pop(block, None)
        key = seq.block_table[0]
        if seq.start_position == 0 or key not in self.states:
            if seq.start_position:
                raise RuntimeError(f"no cached state for a forward at {seq.start_position}")
            self.states[key] = (self.model.new_state(), seq.block_table)
        return self.states[key][0]

    def _drop_freed(self) -> None:
        freed = [k for k, (_, table) in self.states.items() if not table or table[0] != k]
        for key in freed:
            del self.states[key]

    @torch.inference_mode()
    def forward(self, seqs: list[BatchSeq]) -> ForwardResult:
        from specserve.models.deepseek_v4 import V4Context

        self._drop_freed()
        lens = [len(s.token_ids) for s in seqs]
        ctx = V4Context.for_states(
            [self._state(s) for s in seqs], [s.start_position for s in seqs], lens
        )
        return self._run(seqs, ctx)

    def _run(self, seqs: list[BatchSeq], ctx) -> ForwardResult:
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        counts: list[int] = []
        offset = 0
        for s in seqs:
            n = len(s.token_ids)
            ids.extend(s.token_ids)
            pos.extend(range(s.start_position, s.start_position + n))
            rows.extend(range(offset + s.logits_from, offset + n))
            counts.append(n - s.logits_from)
            offset += n
        dev = self.device
        out = self.model(
            torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), ctx, self.capture
        )
        logits = self.model.compute_logits(out.hidden[torch.tensor(rows, device=dev).long()])
        return ForwardResult(logits, counts, out.hidden, out.captured)

    @torch.inference_mode()
    def profile_forward(self, num_tokens: int, num_blocks: int, window: int = 8) -> None:
        """Time-representative forward: verify windows of `window` tokens after a 64-token
        context, on throwaway states."""
        from specserve.models.deepseek_v4 import V4Context

        seqs, left = [], num_tokens
        while left > 0:
            seqs.append(BatchSeq([0] * min(window, left), 64, [0], 0))
            left -= window
        states = []
        for _ in seqs:
            state = self.model.new_state()
            self._run([BatchSeq([0] * 64, 0, [0], 64)], V4Context.for_states([state], [0], [64]))
            states.append(state)
        ctx = V4Context.for_states(states, [64] * len(seqs), [len(s.token_ids) for s in seqs])
        self._run(seqs, ctx)
