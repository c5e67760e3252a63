"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own (two servers in one process do not
mix their counts). The context store's figures are read from the store when the metrics are scraped.

Tokens per second: rate(kvsqueeze_generated_tokens_total) / rate(kvsqueeze_decode_seconds_total).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvsqueeze.serve.store import ContextStore

CONTENT_TYPE = CONTENT_TYPE_LATEST
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class StoreCollector(Collector):
    """The context store's counts and the bytes its cached contexts hold, read at each scrape."""

    def __init__(self, store: ContextStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        counts = self.store.counts
        hits = CounterMetricFamily("kvsqueeze_context_cache_hits", "Requests whose context was cached",
                                   labels=["where"])  # fmt: skip
        hits.add_metric(["memory"], counts.hits_memory)
        hits.add_metric(["disk"], counts.hits_disk)
        yield hits
        yield CounterMetricFamily("kvsqueeze_context_cache_misses", "Requests whose context had to be prefilled",
                                  value=counts.misses)  # fmt: skip
        yield CounterMetricFamily("kvsqueeze_context_cache_evictions",
                                  "Contexts dropped from memory to stay under --max-cache-bytes",
                                  value=counts.evictions)  # fmt: skip
        yield CounterMetricFamily(
            "kvsqueeze_context_cache_too_large",
            "Contexts larger than --max-cache-bytes, never held",
            value=counts.too_large,
        )
        yield GaugeMetricFamily("kvsqueeze_contexts", "Compressed contexts held in memory", value=len(self.store))
        yield GaugeMetricFamily("kvsqueeze_context_kv_bytes",
                                "Bytes of keys and values held by cached contexts (from their storages)",
                                value=self.store.held_bytes)  # fmt: skip
        yield GaugeMetricFamily("kvsqueeze_context_max_kv_bytes", "--max-cache-bytes", value=self.store.max_bytes)


class Metrics:
    """Every metric the server exports; the routes and the engine update them."""

    def __init__(self, store: ContextStore) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvsqueeze_requests", "HTTP requests, by route and status code", ["route", "status"],
                                registry=r)  # fmt: skip
        self.time_to_first_token = Histogram("kvsqueeze_time_to_first_token_seconds",
                                             "From a request's arrival to its first generated text", buckets=_SECONDS,
                                             registry=r)  # fmt: skip
        self.generated_tokens = Counter("kvsqueeze_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("kvsqueeze_prompt_tokens", "Prompt tokens (context + question)", registry=r)
        self.decode_seconds = Counter("kvsqueeze_decode_seconds", "Time spent decoding", registry=r)
        self.prefills = Counter("kvsqueeze_prefills", "Contexts prefilled and compressed", registry=r)
        self.prefill_seconds = Histogram("kvsqueeze_prefill_seconds", "Prefill and compression of one context",
                                         buckets=_SECONDS, registry=r)  # fmt: skip
        self.cancelled = Counter("kvsqueeze_cancelled_requests", "Generations stopped by a client leaving", registry=r)
        self.queued = Gauge("kvsqueeze_queued_requests", "Requests waiting for the model", registry=r)
        self.running = Gauge("kvsqueeze_running_requests", "Requests in the running batch", registry=r)
        self.batch_rows = Histogram("kvsqueeze_batch_rows", "Rows advanced together by one decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)  # fmt: skip
        r.register(StoreCollector(store))

    def render(self) -> bytes:
        return generate_latest(self.registry)
