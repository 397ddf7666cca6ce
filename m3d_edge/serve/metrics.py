"""Prometheus metrics of the server (``GET /metrics``), on a registry of its own per app.

Request counts and latency per route template (never a raw path), time to first text, decode tokens/s,
queue wait and depth, and the study cache's hits, misses, evictions, bytes and hit rate (read at scrape).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class _CacheCollector:
    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self.stats = stats

    def collect(self):
        s = self.stats()
        if not s:
            return
        for name, doc in (
            ("hits", "lookups that found the study"),
            ("misses", "lookups that ran the encoders"),
            ("evictions", "studies evicted over the memory budget"),
        ):
            yield CounterMetricFamily(f"m3d_study_cache_{name}", f"Study cache {doc}.", value=s[name])
        yield GaugeMetricFamily("m3d_study_cache_entries", "Studies in the cache.", value=s["entries"])
        yield GaugeMetricFamily("m3d_study_cache_bytes", "Bytes held by cached studies.", value=s["bytes"])
        yield GaugeMetricFamily(
            "m3d_study_cache_budget_bytes", "The cache's memory budget.", value=s["budget_bytes"]
        )
        yield GaugeMetricFamily("m3d_study_cache_hit_rate", "hits / (hits + misses).", value=s["hit_rate"])


class Metrics:
    def __init__(self, cache_stats: Callable[[], dict[str, float]], queue_depth: Callable[[], int]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "m3d_http_requests", "HTTP requests answered.", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "m3d_http_request_seconds",
            "Request latency.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "m3d_ttft_seconds",
            "Start of a request's run to its first text.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "m3d_queue_wait_seconds", "Admission to start of the run.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.decode_rate = Histogram(
            "m3d_decode_tokens_per_second", "Decode speed per answer.", buckets=RATE_BUCKETS, registry=r
        )
        self.tokens = Counter("m3d_generated_tokens", "Tokens generated.", registry=r)
        self.cancelled = Counter("m3d_cancelled_requests", "Requests stopped early.", ["reason"], registry=r)
        depth = Gauge("m3d_queue_depth", "Requests admitted and not finished.", registry=r)
        depth.set_function(queue_depth)
        r.register(_CacheCollector(cache_stats))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
