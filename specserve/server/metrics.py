"""Prometheus metrics with vLLM-style names under the `specserve:` prefix.

Engine counters are read at scrape time from the `EngineSnapshot` the engine thread publishes (a
custom collector), so scrapes never touch the engine; latency histograms are observed by the HTTP
layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from specserve.engine.engine import EngineStats
from specserve.server.async_engine import EngineSnapshot

PREFIX = "specserve:"
# `vllm bench serve` prints its speculative-decoding section only from `vllm:spec_decode_*`
# lines, so those four counters are also exported under vLLM's prefix (same names and labels).
VLLM_SPEC_PREFIX = "vllm:"

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)


class EngineCollector:
    def __init__(self, snapshot: Callable[[], EngineSnapshot], model_name: str) -> None:
        self.snapshot, self.labels = snapshot, {"model_name": model_name}

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(PREFIX + name, doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _counter(
        self, name: str, doc: str, value: float, prefix: str = PREFIX
    ) -> CounterMetricFamily:
        c = CounterMetricFamily(prefix + name, doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        st = snap.stats
        yield self._gauge(
            "num_requests_running", "Requests in the running batch.", snap.num_running
        )
        yield self._gauge(
            "num_requests_waiting", "Requests waiting to be scheduled.", snap.num_waiting
        )
        yield self._gauge(
            "kv_cache_usage_perc", "Fraction of KV-cache blocks in use.", snap.kv_cache_usage
        )
        yield self._counter("prompt_tokens", "Prompt tokens processed.", st.prompt_tokens)
        yield self._counter("generation_tokens", "Tokens generated.", st.generation_tokens)
        yield self._counter(
            "num_aborted_requests", "Requests aborted (client gone, errors).", st.num_aborted
        )
        yield self._counter("num_preemptions", "Requests preempted.", snap.num_preemptions)
        yield self._counter(
            "prefix_cache_queries",
            "Tokens looked up in the prefix cache.",
            snap.prefix_query_tokens,
        )
        yield self._counter(
            "prefix_cache_hits", "Tokens served from the prefix cache.", snap.prefix_hit_tokens
        )
        yield self._counter(
            "num_step_errors",
            "Engine steps that failed (their requests failed).",
            snap.num_step_errors,
        )
        for prefix in (PREFIX, VLLM_SPEC_PREFIX):
            yield from self._spec_counters(st, prefix)
        yield self._gauge(
            "spec_decode_accept_length",
            "Mean committed tokens per verify pass (bonus included).",
            st.avg_accept_length,
        )
        mean_verify = st.num_verify_tokens_planned / st.num_drafts if st.num_drafts else 0.0
        yield self._gauge(
            "spec_decode_mean_verify_length",
            "Mean draft tokens the verify planner sent to the target.",
            mean_verify,
        )

    def _spec_counters(self, st: EngineStats, prefix: str) -> Iterator[Metric]:
        yield self._counter(
            "spec_decode_num_drafts", "Draft blocks verified.", st.num_drafts, prefix
        )
        yield self._counter(
            "spec_decode_num_draft_tokens", "Draft tokens verified.", st.num_draft_tokens, prefix
        )
        yield self._counter(
            "spec_decode_num_accepted_tokens",
            "Draft tokens accepted.",
            st.num_accepted_tokens,
            prefix,
        )
        per_pos = CounterMetricFamily(
            prefix + "spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by position in the block.",
            labels=[*self.labels, "position"],
        )
        for pos, n in enumerate(st.accepted_per_position):
            per_pos.add_metric([*self.labels.values(), str(pos)], n)
        yield per_pos


class ServerMetrics:
    def __init__(self, snapshot: Callable[[], EngineSnapshot], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(snapshot, model_name))
        labels = ["model_name"]
        self.model_name = model_name
        self.requests = Counter(
            PREFIX + "request_success",
            "Finished requests by reason.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.ttft = self._latency("time_to_first_token_seconds", "Time to first token.")
        self.itl = self._latency("inter_token_latency_seconds", "Time between streamed outputs.")
        self.e2e = self._latency("e2e_request_latency_seconds", "Request latency.")
        self.errors = Counter(
            PREFIX + "request_errors",
            "Requests rejected or failed.",
            [*labels, "code"],
            registry=self.registry,
        )

    def _latency(self, name: str, doc: str) -> Histogram:
        return Histogram(
            PREFIX + name, doc, ["model_name"], buckets=_LATENCY_BUCKETS, registry=self.registry
        )
