"""The engine: one step = schedule -> draft -> plan -> target forward -> verify -> commit.

No speculation is the same loop with a drafter that proposes nothing.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from specserve.config import ConfigError, EngineConfig
from specserve.core import Request, RequestStatus, SamplingParams
from specserve.engine.block_manager import BlockManager
from specserve.engine.model_runner import (
    BatchSeq,
    ModelRunner,
    blocks_with_hidden_pool,
    hidden_bytes_per_token,
    kv_bytes_per_token,
    num_kv_blocks,
)
from specserve.engine.sampler import (
    apply_logit_bias,
    apply_penalties,
    probs_from_logits,
    top_logprobs,
)
from specserve.engine.scheduler import ScheduledRequest, Scheduler
from specserve.engine.state_runner import StateRunner
from specserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from specserve.models.loader import load_model
from specserve.speculative.base import CatchUp, Drafter, DraftProposal, NoDrafter
from specserve.speculative.handle import TargetHandle
from specserve.speculative.planner import Planner, StepStats
from specserve.speculative.verify import greedy_verify, rejection_verify
from specserve.structured.grammar import GrammarBackend, GrammarError, GrammarMatcher

if TYPE_CHECKING:
    from specserve.engine.distributed import RankGroup

log = logging.getLogger("specserve.engine")

IDLE_GAP_S = 0.05  # a longer pause between two steps is idle time (see `step`)


class RequestError(ValueError):
    """A request the engine cannot serve as asked (HTTP 400)."""


class RequestFailed(RuntimeError):
    """A step failed in work that belongs to one request alone. Nothing of the step was
    committed yet, so the caller fails that request and steps again for the others."""

    def __init__(self, request_id: str, cause: Exception) -> None:
        super().__init__(f"request {request_id}: {type(cause).__name__}: {cause}")
        self.request_id = request_id


@contextmanager
def _blame(req: Request) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        raise RequestFailed(req.request_id, e) from e


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    meta_info: dict = field(default_factory=dict)
    error: str | None = None  # set when the request failed inside the engine (finished)
    # with the first output of a request that asked for them: one entry per prompt token,
    # the first one's logprob None (nothing precedes it)
    prompt_logprobs: list[tuple[int, float | None, list[tuple[int, float]]]] | None = None


@dataclass
class EngineStats:
    """Cumulative counters read by /metrics and /get_server_info."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    num_verify_passes: int = 0  # forwards that produced tokens for a decoding request
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    num_verify_tokens_planned: int = 0
    num_aborted: int = 0

    @property
    def avg_accept_length(self) -> float:
        """Committed tokens per verify pass, bonus included (1.0 without speculation)."""
        if not self.num_verify_passes:
            return 0.0
        return 1.0 + self.num_accepted_tokens / self.num_verify_passes


class _Stream:
    """Per-request output state: detokenizer, stop strings, the text already emitted."""

    def __init__(self, request: Request, tokenizer: Tokenizer) -> None:
        self.request = request
        self.detok = IncrementalDetokenizer(tokenizer)
        self.hold = max((len(s) for s in request.params.stop), default=1) - 1
        self.emitted = 0  # characters of detok.text already streamed
        self.pending_tokens: list[int] = []
        self.pending_logprobs: list = []
        ids = request.prompt_token_ids
        # prompt token i's entry arrives with the logits row of token i - 1
        self.prompt_logprobs: list | None = (
            None if request.params.prompt_logprobs is None else [(ids[0], None, [])]
        )
        self.matcher: GrammarMatcher | None = None  # structured output


def _own_cache(model_cfg) -> bool:
    """Whether the model class keeps a cache of its own format (`cache_bytes_per_token`)."""
    from specserve.models.registry import model_class

    return hasattr(model_class(model_cfg.architecture), "cache_bytes_per_token")


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        drafter: Drafter | None = None,
        planner: Planner | None = None,
        *,
        moe_backend: str | None = None,
        group: RankGroup | None = None,
    ) -> None:
        """`moe_backend`: expert weight format (torch | mxfp4; None: as the checkpoint stores
        it). `group`: this is rank 0 of a tensor / expert parallel group (`start_ranks`)."""
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.config, self.group = config, group
        self.model, self.model_config = load_model(
            config.model_path,
            config.torch_dtype,
            config.device,
            group.parallel if group else None,
            moe_backend,
        )
        self.model.fuse()
        self.tokenizer = Tokenizer(config.model_path)
        cache = config.cache
        stateful = hasattr(self.model, "new_state")  # per-request state instead of paged K/V
        if cache.enable_prefix_caching and not getattr(self.model, "supports_prefix_caching", True):
            log.info(
                "prefix caching is off: %s keeps compressed per-request state that is not "
                "split at page boundaries",
                self.model_config.architecture,
            )
            cache = replace(cache, enable_prefix_caching=False)
        if cache.kv_cache_dtype != "auto" and (stateful or _own_cache(self.model_config)):
            raise ConfigError(
                f"--kv-cache-dtype {cache.kv_cache_dtype}: {self.model_config.architecture} keeps "
                "its own compressed cache in the model's dtype; use --kv-cache-dtype auto"
            )
        self.kv_dtype = cache.kv_dtype(config.torch_dtype)
        blocks = num_kv_blocks(self.model_config, cache, self.kv_dtype)
        if group is not None:
            blocks = group.agree_num_blocks(blocks)
        self.cache_config, self.kv_budget_blocks = cache, blocks
        self._use_blocks(blocks)
        self.drafter: Drafter = NoDrafter()
        self.planner = planner or Planner()
        self._catch_up = CatchUp()  # this step's fold of deferred drafter rows (`StepStats`)
        self.runner = (group.make_runner if group else StateRunner if stateful else ModelRunner)(
            self.model,
            blocks,
            cache.page_size,
            config.torch_dtype,
            config.device,
            (),
            config.attention_backend,
            self.kv_dtype,
        )
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )
        self.streams: dict[str, _Stream] = {}
        self.stats = EngineStats()
        self._last_step_end: float | None = None  # when the previous step ended (busy only)
        if drafter is not None:
            self.set_speculation(drafter, self.planner)
        self.grammar = (
            GrammarBackend(config.model_path, self.model_config.vocab_size, self.eos_token_ids)
            if config.grammar_backend == "llguidance"
            else None
        )

    def close(self) -> None:
        """Stop the other ranks of a parallel group (nothing to do in one process)."""
        if self.group is not None:
            self.group.close()

    def target_handle(self) -> TargetHandle:
        """The target parts a drafter shares (whole copies on rank 0 under tensor parallelism)."""
        if self.group is not None and self.group.parallel.tp_size > 1:
            cfg = self.config
            return TargetHandle.unsplit(self.model, cfg.model_path, cfg.torch_dtype, cfg.device)
        return TargetHandle.of(self.model)

    def set_speculation(self, drafter: Drafter, planner: Planner) -> None:
        """Install a drafter (built against this engine's target) before serving starts."""
        assert not self.has_unfinished(), "set speculation before adding requests"
        capture = drafter.capture_layers
        if capture != self.drafter.capture_layers and self.cache_config.enable_prefix_caching:
            self._size_hidden_pool(capture)
        self.drafter, self.planner = drafter, planner
        self.runner.capture = capture

    def _use_blocks(self, blocks: int) -> None:
        """A fresh block manager (an empty prefix cache) and scheduler over `blocks` blocks."""
        cache = self.cache_config
        self.block_manager = BlockManager(blocks, cache.page_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.config.scheduler, self.block_manager)
        self.context_length = min(
            self.config.scheduler.context_length,
            self.model_config.max_position_embeddings,
            blocks * cache.page_size,
        )

    def _size_hidden_pool(self, capture: tuple[int, ...]) -> None:
        """A prefix hit skips the target forward over the cached tokens, so a drafter that reads
        the target's hidden states gets those tokens' rows from a pool kept next to the K/V
        (`ModelRunner.allocate`). The pool shares the cache budget: sized from memory, the cache
        gets fewer blocks. Cached prefixes are dropped: their pages have no rows of `capture`."""
        dtype = self.config.torch_dtype
        hidden = hidden_bytes_per_token(self.model_config, capture, dtype)
        kv = kv_bytes_per_token(self.model_config, self.kv_dtype)
        blocks = blocks_with_hidden_pool(self.kv_budget_blocks, self.cache_config, kv, hidden)
        width = len(capture) * self.model_config.hidden_size
        assert isinstance(self.runner, ModelRunner)  # prefix caching: a paged runner
        self.runner.allocate(blocks, width)
        self._use_blocks(blocks)
        if capture:
            log.info(
                "prefix caching keeps the drafter's hidden states: %d bytes per cached token "
                "beside %d of K/V (%d KV blocks)",
                hidden,
                kv,
                blocks,
            )

    def profile_step(self, num_tokens: int) -> None:
        """One target forward over `num_tokens` verify tokens on scratch KV (SPS profiling).

        Only before the engine serves requests: it writes garbage into free KV blocks."""
        if self.stats.num_steps or self.has_unfinished():
            raise RuntimeError("profile_step must run before the engine serves requests")
        self.runner.profile_forward(num_tokens, self.block_manager.num_blocks)

    # -- requests ----------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> Request:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_request(ids, params)
        req = Request(
            prompt_token_ids=ids,
            params=params,
            max_new_tokens=params.max_tokens or self.context_length - len(ids),
            eos_token_ids=frozenset() if params.ignore_eos else self.eos_token_ids,
        )
        if request_id is not None:
            req.request_id = request_id
        if req.request_id in self.streams:
            raise RequestError(f"duplicate request id {req.request_id!r}")
        stream = _Stream(req, self.tokenizer)
        if params.grammar is not None:  # compiled (and cached) by check_request
            stream.matcher = self._grammar(params).matcher(params.grammar)
        self.streams[req.request_id] = stream
        self.scheduler.add(req)
        return req

    def check_request(self, ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError if the prompt cannot be served. Reads only what is fixed at
        start-up, so the server calls it from its own threads before submitting."""
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t, _ in params.logit_bias):
            raise RequestError(f"logit_bias token ids must be in [0, {vocab})")
        room = self.context_length - len(ids)
        if room < 1:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; this model's context length is "
                f"{self.context_length}"
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise RequestError(
                f"max_tokens ({params.max_tokens}) + prompt tokens ({len(ids)}) exceeds the "
                f"context length ({self.context_length})"
            )
        if params.grammar is not None:
            self._grammar(params)

    def _grammar(self, params: SamplingParams) -> GrammarBackend:
        """The backend, once the request's grammar is known to compile (RequestError if not)."""
        if self.grammar is None:
            raise RequestError("structured output is off on this server (--grammar-backend none)")
        if params.ignore_eos:
            raise RequestError("ignore_eos cannot be combined with structured output")
        try:
            self.grammar.compile(params.grammar)
        except GrammarError as e:
            raise RequestError(str(e)) from None
        return self.grammar

    def abort(self, request_id: str) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            self.stats.num_aborted += 1
            self.drafter.release(stream.request)
            self.planner.release(stream.request)
            self.scheduler.finish(stream.request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        scheduled, preempted = self.scheduler.schedule(self.drafter.max_draft_tokens)
        for req in preempted:  # its KV is recomputed, and `update` replays it to the drafter
            self.drafter.release(req)
        if not scheduled:
            self._last_step_end = None
            return []
        self.stats.num_steps += 1
        # the K/V the decoding requests read: with their number, the key of the step's times
        context = sum(s.request.num_tokens for s in scheduled if s.reaches_end)
        self._catch_up = CatchUp()
        drafts = self._draft(scheduled, context)
        t_fwd = time.perf_counter()
        result = self.runner.forward(
            [self._batch_seq(s, drafts.get(s.request.request_id)) for s in scheduled]
        )
        t_fwd = time.perf_counter() - t_fwd
        finishing = [s for s in scheduled if s.reaches_end]
        rows_of = self._split_logits(scheduled, drafts, result.logits, result.logits_counts)
        new_tokens = self._verify(finishing, drafts, rows_of, result.logits)
        outputs = self._commit(scheduled, drafts, new_tokens, result.captured)
        finished = [s.request for s in scheduled if s.request.finished]
        end, last_end = time.perf_counter(), self._last_step_end
        self._last_step_end = end
        # The serving loop's own work between two steps (outputs, detokenising, streaming) is
        # part of what a step costs per token; a longer gap is idle time, not serving work.
        gap = t0 - last_end if last_end is not None and t0 - last_end < IDLE_GAP_S else 0.0
        step_s = end - t0 + gap
        self.planner.observe(
            StepStats(
                num_requests=len(drafts),
                overhead_s=step_s - t_fwd,
                step_s=step_s,
                decode_only=all(s.num_new_tokens == 1 for s in finishing)
                and finishing == scheduled,
                num_decoding=len(finishing),
                context_tokens=context,
                accepted={
                    rid: len(new_tokens[rid][0]) - 1 for rid, d in drafts.items() if d.tokens
                },
                finished=tuple(r.request_id for r in finished),
                catch_up=self._catch_up,
            )
        )
        for req in finished:
            self.drafter.release(req)
            self.scheduler.finish(req, req.status)
            del self.streams[req.request_id]
        return outputs

    def _commit(
        self,
        scheduled: list[ScheduledRequest],
        drafts: dict[str, DraftProposal],
        new_tokens: dict[str, tuple[list[int], list]],
        captured: torch.Tensor | None,
    ) -> list[RequestOutput]:
        """Commit the KV of the computed and accepted tokens, append the new tokens, and feed
        the drafter the committed tokens' hidden states."""
        outputs: list[RequestOutput] = []
        committed_hidden: list[torch.Tensor | None] = []
        offset = 0
        for s in scheduled:
            req = s.request
            n_in = s.num_new_tokens + len(drafts.get(req.request_id, DraftProposal([])).tokens)
            if s.reaches_end:
                tokens, logprobs = new_tokens[req.request_id]
                n_commit = s.num_new_tokens + len(tokens) - 1
            else:
                n_commit, tokens, logprobs = s.num_new_tokens, [], []
            if captured is not None:
                committed_hidden.append(
                    self._unseen_hidden(req, captured[offset : offset + n_commit])
                )
            else:
                committed_hidden.append(None)
            offset += n_in
            req.num_computed_tokens += n_commit
            self.block_manager.rollback(req, req.num_computed_tokens)
            self.block_manager.commit(req, req.num_computed_tokens)
            if tokens:
                outputs.append(self._append_or_fail(req, tokens, logprobs))
        self.drafter.update([s.request for s in scheduled], committed_hidden)
        return outputs

    def _unseen_hidden(self, req: Request, rows: torch.Tensor) -> torch.Tensor:
        """The hidden rows the drafter has not seen: this step's, after a prefix hit preceded by
        the cached prefix's rows from the hidden pool (the first forward of a request starts
        right after its cached tokens; `num_computed_tokens` does not count this step yet)."""
        cached = req.num_cached_tokens
        if not cached or req.num_computed_tokens != cached:
            return rows
        pages = req.block_table[: cached // self.block_manager.page_size]
        assert isinstance(self.runner, ModelRunner)  # a prefix hit: a paged runner
        return torch.cat([self.runner.cached_hidden(pages).to(rows.dtype), rows])

    def _draft(
        self, scheduled: list[ScheduledRequest], context_tokens: int
    ) -> dict[str, DraftProposal]:
        spec = [s for s in scheduled if s.num_lookahead > 0 and s.reaches_end]
        num_decoding = sum(s.reaches_end for s in scheduled)
        allowed = self.planner.allow([s.request for s in spec], num_decoding, context_tokens)
        spec = [s for s, ok in zip(spec, allowed, strict=True) if ok]
        if not spec:
            return {}
        reqs = [s.request for s in spec]
        proposals = self.drafter.propose(reqs, [s.num_lookahead for s in spec])
        self._catch_up = self.drafter.catch_up
        lens = self.planner.plan(proposals, reqs)
        out = {}
        for req, p, n in zip(reqs, proposals, lens, strict=True):
            self.stats.num_verify_tokens_planned += n
            out[req.request_id] = DraftProposal(
                p.tokens[:n],
                None if p.probs is None else p.probs[:n],
                None if p.confidences is None else p.confidences[:n],
            )
        return out

    def _batch_seq(self, s: ScheduledRequest, draft: DraftProposal | None) -> BatchSeq:
        req = s.request
        start = req.num_computed_tokens
        tokens = req.all_token_ids[start : start + s.num_new_tokens]
        if draft is not None:
            tokens = tokens + draft.tokens
        logits_from = s.num_new_tokens - 1 if s.reaches_end else len(tokens)
        if self._scores_prompt(req):
            logits_from = 0
        return BatchSeq(tokens, start, req.block_table, logits_from)

    def _scores_prompt(self, req: Request) -> bool:
        """This request wants prompt logprobs and some prompt tokens are not scored yet."""
        stream = self.streams[req.request_id]
        return (
            stream.prompt_logprobs is not None
            and len(stream.prompt_logprobs) < req.num_prompt_tokens
        )

    def _split_logits(
        self,
        scheduled: list[ScheduledRequest],
        drafts: dict[str, DraftProposal],
        logits: torch.Tensor,
        counts: list[int],
    ) -> dict[str, torch.Tensor]:
        """The rows each finishing request verifies (its last draft + 1 rows); rows before them
        score prompt tokens for requests that asked for prompt logprobs."""
        rows_of: dict[str, torch.Tensor] = {}
        row = 0
        for s, c in zip(scheduled, counts, strict=True):
            req, rows = s.request, logits[row : row + c]
            row += c
            if self._scores_prompt(req):
                with _blame(req):
                    self._score_prompt(req, req.num_computed_tokens, rows)
            if s.reaches_end:
                n_verify = 1 + len(drafts.get(req.request_id, DraftProposal([])).tokens)
                rows_of[req.request_id] = rows[c - n_verify :]
        return rows_of

    def _score_prompt(self, req: Request, start: int, rows: torch.Tensor) -> None:
        """rows[j] holds the logits after token start + j: they score prompt token start + j + 1.
        A chunk recomputed after preemption is not scored twice."""
        entries, k = self.streams[req.request_id].prompt_logprobs, req.params.prompt_logprobs
        assert entries is not None and k is not None  # checked by _scores_prompt
        first = len(entries)  # the next prompt token without an entry
        end = min(start + rows.shape[0] + 1, req.num_prompt_tokens)
        if end <= first:
            return
        ids = req.prompt_token_ids
        scored = top_logprobs(
            rows[first - 1 - start : end - 1 - start],
            torch.tensor(ids[first:end], device=rows.device),
            k,
        )
        entries.extend((t, lp, top) for t, (lp, top) in zip(ids[first:end], scored, strict=True))

    def _verify(
        self,
        finishing: list[ScheduledRequest],
        drafts: dict[str, DraftProposal],
        rows_of: dict[str, torch.Tensor],
        logits: torch.Tensor,
    ) -> dict[str, tuple[list[int], list]]:
        """Tokens to append per finishing request (accepted drafts + one from the target)."""
        out: dict[str, tuple[list[int], list]] = {}
        for greedy in (True, False):
            group = [s.request for s in finishing if s.request.params.greedy == greedy]
            if not group:
                continue
            props = [drafts.get(r.request_id, DraftProposal([])) for r in group]
            k = max(len(p.tokens) for p in props)
            if greedy and not any(self._shapes_logits(r) for r in group):
                # greedy, nothing shapes the logits: one argmax over every verified row, then
                # each request keeps its draft's longest prefix that matches and the next token
                best = torch.cat([rows_of[r.request_id] for r in group]).argmax(dim=-1).tolist()
                kept, row = [], 0
                for p in props:
                    target = best[row : row + len(p.tokens) + 1]
                    row += len(target)
                    n = 0
                    while n < len(p.tokens) and p.tokens[n] == target[n]:
                        n += 1
                    kept.append(target[: n + 1])
                tokens = torch.tensor([t + [-1] * (k + 1 - len(t)) for t in kept])
                num = torch.tensor([len(t) for t in kept])
                self._emit_verified(group, props, rows_of, tokens, num, out)
                continue
            vocab = logits.shape[1]
            draft_tokens = torch.zeros(len(group), k, dtype=torch.long)
            lens = torch.tensor([len(p.tokens) for p in props])
            # greedy: penalised logits (only their argmax is used); else target probabilities
            probs = logits.new_zeros(len(group), k + 1, vocab)
            for i, (r, p) in enumerate(zip(group, props, strict=True)):
                draft_tokens[i, : len(p.tokens)] = torch.tensor(p.tokens, dtype=torch.long)
                rows = rows_of[r.request_id]
                n = rows.shape[0]
                with _blame(r):
                    if r.params.has_penalties:  # row j follows the drafts before it
                        hist = [r.output_token_ids + p.tokens[:j] for j in range(n)]
                        rows = apply_penalties(rows, [r.params] * n, [r.prompt_token_ids] * n, hist)
                    if r.params.logit_bias:  # the target distribution at every verified position
                        rows = apply_logit_bias(rows, r.params.logit_bias)
                    matcher = self.streams[r.request_id].matcher
                    if matcher is not None:  # the grammar masks every verified position
                        allowed, keep = matcher.masks_along(p.tokens)
                        lens[i], n = keep, keep + 1
                        rows = rows[:n].masked_fill(~allowed.to(rows.device), float("-inf"))
                    probs[i, :n] = rows if greedy else probs_from_logits(rows, [r.params] * n)
            if greedy:
                tokens, num = greedy_verify(draft_tokens, lens, probs.argmax(dim=-1))
            else:
                q = None
                if any(p.probs is not None for p in props):
                    q = logits.new_zeros(len(group), max(k, 1), vocab)
                    for i, p in enumerate(props):
                        if p.probs is not None:
                            q[i, : len(p.tokens)] = p.probs
                        else:  # deterministic proposal: one-hot
                            q[i, torch.arange(len(p.tokens)), draft_tokens[i, : len(p.tokens)]] = 1
                tokens, num = rejection_verify(
                    draft_tokens, lens, q, probs, [r.generator for r in group]
                )
            self._emit_verified(group, props, rows_of, tokens, num, out)
        return out

    def _shapes_logits(self, req: Request) -> bool:
        """Whether the request's verified rows need more than an argmax or a softmax."""
        p = req.params
        return (
            p.has_penalties
            or bool(p.logit_bias)
            or self.streams[req.request_id].matcher is not None
        )

    def _emit_verified(
        self,
        group: list[Request],
        props: list[DraftProposal],
        rows_of: dict[str, torch.Tensor],
        tokens: torch.Tensor,
        num: torch.Tensor,
        out: dict[str, tuple[list[int], list]],
    ) -> None:
        """out[request] = (tokens it appends, their logprobs if asked); spec counters."""
        for i, r in enumerate(group):
            toks = tokens[i, : num[i]].tolist()
            lp = []
            if r.params.logprobs is not None:
                raw = rows_of[r.request_id][: len(toks)]
                with _blame(r):
                    lp = top_logprobs(raw, tokens[i, : len(toks)], r.params.logprobs)
            out[r.request_id] = (toks, lp)
            self._count_spec(r, len(props[i].tokens), len(toks) - 1)

    def _count_spec(self, req: Request, drafted: int, accepted: int) -> None:
        st = self.stats
        req.spec_verify_ct += 1
        if req.output_token_ids:  # a decode pass (the prefill's first token is not one)
            st.num_verify_passes += 1
        if drafted == 0:
            return
        st.num_drafts += 1
        st.num_draft_tokens += drafted
        st.num_accepted_tokens += accepted
        req.spec_draft_token_num += drafted
        req.spec_accept_token_num += accepted
        if len(st.accepted_per_position) < drafted:
            st.accepted_per_position.extend([0] * (drafted - len(st.accepted_per_position)))
        for pos in range(accepted):
            st.accepted_per_position[pos] += 1
        hist = req.spec_accept_histogram
        if len(hist) <= accepted:
            hist.extend([0] * (accepted + 1 - len(hist)))
        hist[accepted] += 1

    # -- output --------------------------------------------------------------------------
    def _append_or_fail(self, req: Request, tokens: list[int], logprobs: list) -> RequestOutput:
        """`_append`, or, if that fails, a finished output carrying the error: the step's other
        requests are already committed, so their outputs must not be lost with it."""
        try:
            return self._append(req, tokens, logprobs)
        except Exception as e:
            log.exception("request %s failed while appending tokens", req.request_id)
            req.status = RequestStatus.FINISHED_ABORTED
            self.stats.num_aborted += 1
            error = f"{type(e).__name__}: {e}"
            return RequestOutput(req.request_id, [], "", True, "abort", error=error)

    def _append(self, req: Request, tokens: list[int], logprobs: list) -> RequestOutput:
        """Append tokens one by one, stopping exactly where plain decoding would."""
        stream = self.streams[req.request_id]
        p = req.params
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
            self.stats.prompt_tokens += req.num_prompt_tokens
        for i, tok in enumerate(tokens):
            req.output_token_ids.append(tok)
            self.stats.generation_tokens += 1
            stream.pending_tokens.append(tok)
            if stream.matcher is not None:
                stream.matcher.advance([tok])
            if i < len(logprobs):
                stream.pending_logprobs.append((tok, *logprobs[i]))
            if tok in req.eos_token_ids or tok in p.stop_token_ids:
                req.status, req.stop_reason = (
                    RequestStatus.FINISHED_STOPPED,
                    (None if tok in req.eos_token_ids else tok),
                )
                break
            stream.detok.add(tok)
            if p.stop and self._hit_stop(stream):
                break
            if len(req.output_token_ids) >= req.max_new_tokens:
                req.status = RequestStatus.FINISHED_LENGTH
                break
        return self._emit(stream)

    def _hit_stop(self, stream: _Stream) -> bool:
        text = stream.detok.text
        window = max(len(s) for s in stream.request.params.stop) + 16
        lo = max(0, len(text) - window)
        hits = [(text.find(s, lo), s) for s in stream.request.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        idx, s = min(hits)
        stream.detok.text = text[:idx]
        stream.request.status = RequestStatus.FINISHED_STOPPED
        stream.request.stop_reason = s
        return True

    def _emit(self, stream: _Stream) -> RequestOutput:
        req = stream.request
        done = req.status.finished
        text = stream.detok.text
        upto = len(text) if done else max(stream.emitted, len(text) - stream.hold)
        delta = text[stream.emitted : upto]
        stream.emitted = upto
        out = RequestOutput(
            request_id=req.request_id,
            new_token_ids=stream.pending_tokens,
            new_text=delta,
            finished=done,
            finish_reason=req.status.value if done else None,
            stop_reason=req.stop_reason,
            prompt_tokens=req.num_prompt_tokens,
            completion_tokens=len(req.output_token_ids),
            cached_tokens=req.num_cached_tokens,
            logprobs=stream.pending_logprobs,
            meta_info=_meta_info(req, self.drafter.max_draft_tokens > 0),
            prompt_logprobs=stream.prompt_logprobs,
        )
        stream.pending_tokens, stream.pending_logprobs = [], []
        stream.prompt_logprobs = None  # sent once, with the first output
        return out


def _meta_info(req: Request, speculative: bool) -> dict:
    """SGLang's meta_info; a speculative engine reports the accept length of every request,
    1.0 for one the draft gate never let draft."""
    info = {
        "id": req.request_id,
        "prompt_tokens": req.num_prompt_tokens,
        "completion_tokens": len(req.output_token_ids),
        "cached_tokens": req.num_cached_tokens,
        "spec_verify_ct": req.spec_verify_ct,
    }
    if speculative or req.spec_draft_token_num:
        info.update(
            spec_accept_length=len(req.output_token_ids) / max(1, req.spec_verify_ct),
            spec_draft_token_num=req.spec_draft_token_num,
            spec_accept_token_num=req.spec_accept_token_num,
            spec_accept_histogram=list(req.spec_accept_histogram),
        )
    return info
