"""`specserve bench serve`: one benchmark run against an OpenAI-compatible server.

Resolve the model from /v1/models, build the prompts, warm up, snapshot the server's
spec-decode counters, send every request (Poisson arrivals, bounded concurrency), read the
counters again, then print the `sglang.bench_serving` summary and append one JSONL line.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import TextIO

import httpx

from specserve.bench import datasets, server_stats
from specserve.bench.client import BACKENDS, Sampling, build_payload, stream_request
from specserve.bench.datasets import DatasetRow, Tokenizer
from specserve.bench.metrics import (
    BenchmarkMetrics,
    RequestTrace,
    compute_metrics,
    format_summary,
    result_fields,
)

DATASETS = ("random", "random-ids", "jsonl", "sharegpt")


class BenchError(ValueError):
    """A benchmark that cannot run as asked: bad options, unreachable server, unknown model."""


@dataclass(frozen=True)
class BenchConfig:
    base_url: str = "http://127.0.0.1:30000"
    model: str | None = None  # None: the first model /v1/models lists
    backend: str = "openai"
    dataset_name: str = "random"
    dataset_path: str | None = None
    tokenizer: str | None = None  # directory with tokenizer.json, or the file
    random_input_len: int = 1024
    random_output_len: int = 1024
    random_range_ratio: float = 1.0
    random_vocab_size: int | None = None  # random-ids: ids drawn below this (tokenizer's, or 256)
    sharegpt_output_len: int | None = None
    num_prompts: int = 1000
    max_concurrency: int | None = None
    request_rate: float = math.inf
    warmup_requests: int = 1
    temperature: float = 0.0
    ignore_eos: bool = False
    seed: int = 1
    output_file: str | None = None
    output_details: bool = False
    request_timeout: float = 600.0  # seconds without a byte from the server before a request fails
    disable_tqdm: bool = False
    tag: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.base_url.startswith(("http://", "https://")):
            problems.append(f"base URL must start with http:// or https://, got {self.base_url!r}")
        if self.backend not in BACKENDS:
            problems.append(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.dataset_name not in DATASETS:
            problems.append(
                f"unknown dataset {self.dataset_name!r}; choose from {', '.join(DATASETS)}"
            )
        if self.dataset_name in ("jsonl", "sharegpt") and not self.dataset_path:
            problems.append(f"dataset {self.dataset_name} needs --dataset-path")
        if self.dataset_name == "random" and not self.tokenizer:
            problems.append("dataset random needs --tokenizer DIR (or use random-ids)")
        if self.dataset_name == "random-ids" and self.backend == "openai-chat":
            problems.append("random-ids sends token ids, which chat completions cannot take")
        for name in ("num_prompts", "random_input_len", "random_output_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if not 0.0 <= self.random_range_ratio <= 1.0:
            problems.append(f"random_range_ratio must be in [0, 1], got {self.random_range_ratio}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            problems.append("max_concurrency must be at least 1")
        if not self.request_rate > 0:
            problems.append("request_rate must be positive (inf: send all at once)")
        if self.warmup_requests < 0:
            problems.append("warmup_requests must be 0 or more")
        if problems:
            raise BenchError("; ".join(problems))

    def default_output_file(self) -> str:
        """sglang's default name: backend_MMDD_prompts_in_out.jsonl (random) or ..._dataset."""
        now = datetime.now().strftime("%m%d")
        tail = (
            f"{self.random_input_len}_{self.random_output_len}"
            if self.dataset_name.startswith("random")
            else self.dataset_name
        )
        return f"{self.backend}_{now}_{self.num_prompts}_{tail}.jsonl"


OPTION_NAMES = tuple(f.name for f in fields(BenchConfig))
_INTS = {
    "random_input_len",
    "random_output_len",
    "random_vocab_size",
    "sharegpt_output_len",
    "num_prompts",
    "max_concurrency",
    "warmup_requests",
    "seed",
}
_FLOATS = {"random_range_ratio", "request_rate", "temperature", "request_timeout"}
_BOOLS = {"ignore_eos", "output_details", "disable_tqdm"}


def load_rows(cfg: BenchConfig, tok: Tokenizer | None) -> list[DatasetRow]:
    rng = random.Random(cfg.seed)
    n, i, o, r = (
        cfg.num_prompts,
        cfg.random_input_len,
        cfg.random_output_len,
        cfg.random_range_ratio,
    )
    if cfg.dataset_name == "random":
        assert tok is not None
        return datasets.sample_random(tok, n, i, o, r, rng)
    if cfg.dataset_name == "random-ids":
        vocab = cfg.random_vocab_size or (tok.vocab_size if tok else 256)
        return datasets.sample_random_ids(n, i, o, r, vocab, rng)
    if cfg.dataset_name == "jsonl":
        return datasets.load_jsonl(cfg.dataset_path, n, o, tok)
    return datasets.load_sharegpt(cfg.dataset_path, n, tok, cfg.sharegpt_output_len, rng)


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait after each of n requests: exponential (Poisson arrivals), 0 at inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


async def resolve_model(http: httpx.AsyncClient, base_url: str, model: str | None) -> str:
    try:
        r = await http.get(f"{base_url}/v1/models", timeout=10.0)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {base_url}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        if model:
            return model  # the server does not list models; trust the flag
        raise BenchError(f"{base_url}/v1/models answered HTTP {r.status_code}; pass --model")
    try:
        served = [m["id"] for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"{base_url}/v1/models did not return an OpenAI model list") from None
    if model is None:
        if not served:
            raise BenchError(f"{base_url} serves no models")
        return served[0]
    if model not in served:
        raise BenchError(
            f"model {model!r} is not served by {base_url}; it serves: {', '.join(served) or 'none'}"
        )
    return model


async def send_all(
    rows: list[DatasetRow],
    send: Callable[[DatasetRow], Awaitable[RequestTrace]],
    gaps: list[float],
    max_concurrency: int | None,
    on_done: Callable[[], None],
) -> tuple[list[RequestTrace], float]:
    """Launch the requests on the arrival schedule; returns traces (in row order) and duration."""
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(row: DatasetRow) -> RequestTrace:
        if sem is None:
            trace = await send(row)
        else:
            async with sem:
                trace = await send(row)
        on_done()
        return trace

    start = time.perf_counter()
    tasks = []
    for k, row in enumerate(rows):
        tasks.append(asyncio.create_task(one(row)))
        if gaps[k] > 0 and k + 1 < len(rows):
            await asyncio.sleep(gaps[k])
    traces = await asyncio.gather(*tasks)
    return list(traces), time.perf_counter() - start


async def _benchmark(cfg: BenchConfig, tok: Tokenizer | None, rows: list[DatasetRow]) -> dict:
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.request_timeout, connect=10.0)
    base = cfg.base_url.rstrip("/")
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        model = await resolve_model(http, base, cfg.model)
        url = base + BACKENDS[cfg.backend]
        sampling = Sampling(cfg.temperature, cfg.ignore_eos)
        count = (lambda text: len(tok.encode(text))) if tok else None

        def send(row: DatasetRow, max_tokens: int | None = None) -> Awaitable[RequestTrace]:
            payload = build_payload(
                cfg.backend, model, row.prompt, max_tokens or row.output_len, sampling
            )
            return stream_request(http, url, payload, row.prompt_len, count)

        if cfg.warmup_requests:
            warm = [send(rows[0], min(rows[0].output_len, 32)) for _ in range(cfg.warmup_requests)]
            warm_traces = await asyncio.gather(*warm)
            if not any(t.success for t in warm_traces):
                raise BenchError(f"all warmup requests failed: {warm_traces[0].error}")
        before = await server_stats.fetch_counters(http, base)
        pbar = tqdm(total=len(rows), disable=cfg.disable_tqdm, file=sys.stderr)
        try:
            gaps = arrival_gaps(len(rows), cfg.request_rate, cfg.seed)
            traces, duration = await send_all(rows, send, gaps, cfg.max_concurrency, pbar.update)
        finally:
            pbar.close()
        after = await server_stats.fetch_counters(http, base)
        info = await server_stats.fetch_server_info(http, base)
    spec = server_stats.combine(before, after, info)
    return _result(cfg, model, tok, rows, traces, duration, spec, info)


def _result(
    cfg: BenchConfig,
    model: str,
    tok: Tokenizer | None,
    rows: list[DatasetRow],
    traces: list[RequestTrace],
    duration: float,
    spec: server_stats.SpecStats,
    info: dict | None,
) -> dict:
    retok = [len(tok.encode(t.generated_text)) for t in traces] if tok else None
    m = compute_metrics(traces, duration, retok)
    mismatches = None
    if tok is not None and cfg.backend == "openai":
        mismatches = sum(
            1
            for t, row in zip(traces, rows, strict=True)
            if t.success and t.usage_reported and t.prompt_len != tok.count(row.prompt)
        )
    result = {
        "tag": cfg.tag,
        "backend": cfg.backend,
        "dataset_name": cfg.dataset_name,
        "request_rate": cfg.request_rate,
        "max_concurrency": cfg.max_concurrency,
        "sharegpt_output_len": cfg.sharegpt_output_len,
        "random_input_len": cfg.random_input_len,
        "random_output_len": cfg.random_output_len,
        "random_range_ratio": cfg.random_range_ratio,
        "server_info": info,
        **result_fields(m),
        "accept_length": spec.accept_length,
        "accept_length_source": spec.source,
        "spec_accept_rate_per_pos": spec.accept_rate_per_pos,
        "model": model,
        "base_url": cfg.base_url,
        "num_prompts": cfg.num_prompts,
        "seed": cfg.seed,
        "prompt_len_mismatches": mismatches,
        "usage_missing": sum(1 for t in traces if t.success and not t.usage_reported),
    }
    result["_summary"] = _summary_text(cfg, m, spec, result)
    if cfg.output_details:
        result |= {
            "input_lens": [t.prompt_len for t in traces],
            "output_lens": [t.output_len if t.success else 0 for t in traces],
            "ttfts": [t.ttft for t in traces],
            "itls": [t.itl for t in traces],
            "generated_texts": [t.generated_text for t in traces],
            "errors": [t.error for t in traces],
        }
    return result


def _summary_text(
    cfg: BenchConfig, m: BenchmarkMetrics, spec: server_stats.SpecStats, result: dict
) -> str:
    lines = [
        format_summary(m, cfg.backend, cfg.request_rate, cfg.max_concurrency, spec.accept_length)
    ]
    if spec.accept_rate_per_pos:
        rates = " ".join(f"{r:.3f}" for r in spec.accept_rate_per_pos)
        lines.append(f"Accept rate per draft position: {rates}")
    for err, n in sorted(m.errors.items(), key=lambda kv: -kv[1]):
        lines.append(f"Failed x{n}: {err}")
    if result["prompt_len_mismatches"]:
        lines.append(
            f"Prompt length check: {result['prompt_len_mismatches']} of {m.completed} prompts "
            "differ from the server's prompt_tokens"
        )
    if result["usage_missing"]:
        lines.append(
            f"Warning: {result['usage_missing']} responses had no usage; their output lengths "
            "are " + ("retokenized" if cfg.tokenizer else "the requested max_tokens")
        )
    return "\n".join(lines)


def run(cfg: BenchConfig, out: TextIO | None = None, extra: dict | None = None) -> dict:
    """Run the benchmark, print the summary, append the JSONL line (`extra` fields first);
    returns the result."""
    out = out or sys.stdout
    try:
        tok = Tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        rows = load_rows(cfg, tok)
    except datasets.DatasetError as e:
        raise BenchError(str(e)) from None
    print(f"bench serve: {len(rows)} prompts ({cfg.dataset_name}) -> {cfg.base_url}", file=out)
    result = asyncio.run(_benchmark(cfg, tok, rows))
    summary = result.pop("_summary")
    result = (extra or {}) | result
    print(summary, file=out)
    path = cfg.output_file or cfg.default_output_file()
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    print(f"Result appended to {path}", file=out)
    return result


def config_from_options(options: dict) -> BenchConfig:
    """A BenchConfig from a mapping (YAML workload, argparse namespace); names may use dashes."""
    given = {k.replace("-", "_"): v for k, v in options.items()}
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise BenchError(
            f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(OPTION_NAMES)}"
        )
    for name, value in given.items():
        if value is None:
            continue
        try:
            if name in _BOOLS and not isinstance(value, bool):
                raise ValueError("expected true or false")
            if name in _INTS:
                given[name] = int(value)
            elif name in _FLOATS:
                given[name] = float(value)
            elif name not in _BOOLS:
                given[name] = str(value)
        except (TypeError, ValueError) as e:
            raise BenchError(f"option {name}: bad value {value!r}: {e}") from None
    return BenchConfig(**given)
