"""Offline generation: `LLM(model_path).generate(prompts, params)`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from specserve.config import CacheConfig, EngineConfig, SchedulerConfig
from specserve.core import SamplingParams, choice_seed
from specserve.engine.engine import LLMEngine


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list = field(default_factory=list)


@dataclass
class GenerationOutput:
    prompt: str | list[int]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    meta_info: list[dict]
    prompt_logprobs: list | None = None  # (token, logprob or None, top) per prompt token


class LLM:
    def __init__(self, model_path: str, **kwargs: Any) -> None:
        """kwargs: EngineConfig fields (dtype, device, seed), CacheConfig and SchedulerConfig
        fields (page_size, max_total_tokens, max_running_requests, ...), and `drafter` /
        `planner` for speculative decoding."""
        cache_keys = CacheConfig.__dataclass_fields__.keys()
        sched_keys = SchedulerConfig.__dataclass_fields__.keys()
        cache = CacheConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in cache_keys})
        sched = SchedulerConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in sched_keys})
        extra = {k: kwargs.pop(k) for k in ("drafter", "planner") if k in kwargs}
        config = EngineConfig(model_path=model_path, cache=cache, scheduler=sched, **kwargs)
        self.engine = LLMEngine(config, **extra)

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        requests = []
        for prompt, p in zip(prompts, plist, strict=True):
            group = []
            for i in range(p.n):
                sub = replace(p, n=1, seed=choice_seed(p.seed, i))
                group.append(self.engine.add_request(prompt, sub))
            requests.append(group)
        texts: dict[str, list[str]] = {}
        logprobs: dict[str, list] = {}
        finals: dict[str, Any] = {}
        prompt_logprobs: dict[str, list] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.prompt_logprobs is not None:
                    prompt_logprobs[out.request_id] = out.prompt_logprobs
                texts.setdefault(out.request_id, []).append(out.new_text)
                logprobs.setdefault(out.request_id, []).extend(out.logprobs)
                if out.finished:
                    finals[out.request_id] = out
        results = []
        for prompt, group in zip(prompts, requests, strict=True):
            outs = [
                CompletionOutput(
                    i,
                    "".join(texts.get(r.request_id, [])),
                    list(r.output_token_ids),
                    finals[r.request_id].finish_reason,
                    logprobs.get(r.request_id, []),
                )
                for i, r in enumerate(group)
            ]
            results.append(
                GenerationOutput(
                    prompt,
                    group[0].prompt_token_ids,
                    outs,
                    [finals[r.request_id].meta_info for r in group],
                    prompt_logprobs.get(group[0].request_id),
                )
            )
        return results
