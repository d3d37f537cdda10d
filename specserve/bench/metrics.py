"""Serving metrics from request traces, defined as in `sglang.bench_serving`.

Pure functions: a list of `RequestTrace` and the run duration in, one `BenchmarkMetrics`
out. Over successful requests: TTFT is the time to the first non-empty streamed chunk,
TPOT = (latency - TTFT) / (output tokens - 1) for outputs longer than one token, ITL is
every gap between consecutive non-empty chunks (a chunk may carry several tokens under
speculative decoding), E2E is the request latency, concurrency = sum(E2E) / duration.
Statistics follow numpy: population std, linear-interpolated percentiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestTrace:
    """What the client saw of one request. Times are seconds, relative to `start_time`."""

    success: bool = False
    prompt_len: int = 0  # input tokens: the server's usage.prompt_tokens, else the dataset's
    output_len: int = 0  # output tokens: the server's usage.completion_tokens
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0  # perf_counter() when the request was sent
    error: str = ""
    generated_text: str = ""
    usage_reported: bool = True  # False: output_len is a client-side estimate


@dataclass(frozen=True)
class Stats:
    mean: float
    median: float
    std: float
    p95: float
    p99: float

    @staticmethod
    def of(values_s: list[float]) -> Stats:
        """Summary in milliseconds of values in seconds; zeros for an empty list (as sglang)."""
        a = np.asarray(values_s or [0.0], dtype=np.float64) * 1000.0
        return Stats(
            mean=float(np.mean(a)),
            median=float(np.median(a)),
            std=float(np.std(a)),
            p95=float(np.percentile(a, 95)),
            p99=float(np.percentile(a, 99)),
        )


@dataclass(frozen=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    duration: float
    total_input: int
    total_output: int
    total_output_retokenized: int | None
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2e: Stats
    max_itl_ms: float
    concurrency: float
    errors: dict[str, int]  # error message -> number of failed requests with it


def compute_metrics(
    traces: list[RequestTrace],
    duration_s: float,
    retokenized_output_lens: list[int] | None = None,
) -> BenchmarkMetrics:
    """Metrics of one run. `retokenized_output_lens`, if given, is aligned with `traces`."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    ok = [t for t in traces if t.success]
    ttfts = [t.ttft for t in ok]
    tpots = [(t.latency - t.ttft) / (t.output_len - 1) for t in ok if t.output_len > 1]
    itls = [gap for t in ok for gap in t.itl]
    e2es = [t.latency for t in ok]
    total_input = sum(t.prompt_len for t in ok)
    total_output = sum(t.output_len for t in ok)
    retok = None
    if retokenized_output_lens is not None:
        retok = sum(n for t, n in zip(traces, retokenized_output_lens, strict=True) if t.success)
    errors: dict[str, int] = {}
    for t in traces:
        if not t.success:
            msg = t.error or "unknown error"
            errors[msg] = errors.get(msg, 0) + 1
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(traces) - len(ok),
        duration=duration_s,
        total_input=total_input,
        total_output=total_output,
        total_output_retokenized=retok,
        request_throughput=len(ok) / duration_s,
        input_throughput=total_input / duration_s,
        output_throughput=total_output / duration_s,
        total_throughput=(total_input + total_output) / duration_s,
        ttft=Stats.of(ttfts),
        tpot=Stats.of(tpots),
        itl=Stats.of(itls),
        e2e=Stats.of(e2es),
        max_itl_ms=max(itls, default=0.0) * 1000.0,
        concurrency=sum(e2es) / duration_s,
        errors=errors,
    )


def result_fields(m: BenchmarkMetrics) -> dict:
    """The result fields of `sglang.bench_serving`'s JSONL line, same names, plus `failed`/`error_counts`."""
    out = {
        "duration": m.duration,
        "completed": m.completed,
        "failed": m.failed,
        "total_input_tokens": m.total_input,
        "total_output_tokens": m.total_output,
        "total_output_tokens_retokenized": m.total_output_retokenized,
        "request_throughput": m.request_throughput,
        "input_throughput": m.input_throughput,
        "output_throughput": m.output_throughput,
        "total_throughput": m.total_throughput,
    }
    for name, key in (("e2e_latency", "e2e"), ("ttft", "ttft"), ("tpot", "tpot"), ("itl", "itl")):
        s: Stats = getattr(m, key)
        out[f"mean_{name}_ms"] = s.mean
        out[f"median_{name}_ms"] = s.median
        out[f"std_{name}_ms"] = s.std
        if key == "itl":
            out["p95_itl_ms"] = s.p95
        out[f"p99_{name}_ms"] = s.p99
    out["max_itl_ms"] = m.max_itl_ms
    out["concurrency"] = m.concurrency
    out["error_counts"] = dict(m.errors)
    return out


def format_summary(
    m: BenchmarkMetrics,
    backend: str,
    request_rate: float,
    max_concurrency: int | None,
    accept_length: float | None = None,
) -> str:
    """The `sglang.bench_serving` result block, same labels and layout."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: object) -> None:
        fmt = "{:<40} {:<10.2f}" if isinstance(value, float) else "{:<40} {:<10}"
        lines.append(fmt.format(label, value))

    def section(title: str) -> None:
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))

    row("Backend:", backend)
    row("Traffic request rate:", request_rate)
    row("Max request concurrency:", max_concurrency if max_concurrency else "not set")
    row("Successful requests:", m.completed)
    row("Failed requests:", m.failed)
    row("Benchmark duration (s):", m.duration)
    row("Total input tokens:", m.total_input)
    row("Total generated tokens:", m.total_output)
    if m.total_output_retokenized is not None:
        row("Total generated tokens (retokenized):", m.total_output_retokenized)
    row("Request throughput (req/s):", m.request_throughput)
    row("Input token throughput (tok/s):", m.input_throughput)
    row("Output token throughput (tok/s):", m.output_throughput)
    row("Total token throughput (tok/s):", m.total_throughput)
    row("Concurrency:", m.concurrency)
    if accept_length:
        row("Accept length:", float(accept_length))
    section("End-to-End Latency")
    row("Mean E2E Latency (ms):", m.e2e.mean)
    row("Median E2E Latency (ms):", m.e2e.median)
    row("P99 E2E Latency (ms):", m.e2e.p99)
    section("Time to First Token")
    row("Mean TTFT (ms):", m.ttft.mean)
    row("Median TTFT (ms):", m.ttft.median)
    row("P99 TTFT (ms):", m.ttft.p99)
    section("Time per Output Token (excl. 1st token)")
    row("Mean TPOT (ms):", m.tpot.mean)
    row("Median TPOT (ms):", m.tpot.median)
    row("P99 TPOT (ms):", m.tpot.p99)
    section("Inter-Token Latency")
    row("Mean ITL (ms):", m.itl.mean)
    row("Median ITL (ms):", m.itl.median)
    row("P95 ITL (ms):", m.itl.p95)
    row("P99 ITL (ms):", m.itl.p99)
    row("Max ITL (ms):", m.max_itl_ms)
    lines.append("=" * 50)
    return "\n".join(lines)
