"""metrics: the service's Prometheus metrics (prometheus_client, one registry per replica).

Scraped at ``GET /metrics`` of the service (text format 0.0.4). With more than one replica a
scrape reaches one of them: each series carries a ``replica`` label.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
SHARE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class ServiceMetrics:
    """Counters, gauges and histograms of one replica (names prefixed ``adacorr_serve_``)."""

    def __init__(self, replica: str = "0", model: str = "", backend: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("replica", "model", "backend")
        self._labels = {"replica": replica, "model": model, "backend": backend}
        reg = self.registry
        self.requests = Counter("adacorr_serve_requests", "HTTP generate requests answered, by status code",
                                labels + ("code",), registry=reg)
        self.latency = Histogram("adacorr_serve_request_seconds", "Latency of answered generate requests (s)",
                                 labels, buckets=LATENCY_BUCKETS, registry=reg)
        self.skipped = Histogram("adacorr_serve_skipped_share", "Share of block evaluations reused per request",
                                 labels, buckets=SHARE_BUCKETS, registry=reg)
        self.blocks_skipped = Counter("adacorr_serve_blocks_skipped", "Block evaluations reused (rows x blocks x steps)",
                                      labels, registry=reg)
        self.blocks_run = Counter("adacorr_serve_blocks", "Block evaluations, reused or computed (rows x blocks x steps)",
                                  labels, registry=reg)
        self.lam = Histogram("adacorr_serve_mean_lambda", "Mean correction weight lambda of a request's rows",
                             labels, buckets=SHARE_BUCKETS, registry=reg)
        self.batch = Histogram("adacorr_serve_batch_requests", "Requests sharing one generation",
                               labels, buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=reg)
        self.fallbacks = Gauge("adacorr_serve_fallbacks", "Graphs the backend compiled without caching (see logs)",
                               labels, registry=reg)
        self.compiles = Counter("adacorr_serve_compile_events", "Graphs compiled, by phase (warmup, serving)",
                                labels + ("phase",), registry=reg)
        self.compile_seconds = Gauge("adacorr_serve_warmup_seconds", "Seconds the replica's compile and warm-up took",
                                     labels, registry=reg)
        self.errors = Counter("adacorr_serve_generation_errors", "Generations that failed (each answered 500)",
                              labels, registry=reg)
        self.ready = Gauge("adacorr_serve_ready", "1 when the replica is compiled, warm and serving", labels, registry=reg)

    def _l(self, metric: Any, **extra: str) -> Any:
        return metric.labels(**self._labels, **extra)

    def answered(self, code: int, seconds: float | None = None) -> None:
        self._l(self.requests, code=str(code)).inc()
        if seconds is not None and code < 400:
            self._l(self.latency).observe(seconds)

    def generated(self, outcome: Any, blocks: int) -> None:
        """One request served: its skipped share, lambda, batch and compiles."""
        rows = outcome.request.images * 2 * outcome.request.steps * blocks  # CFG doubles the rows
        self._l(self.blocks_run).inc(rows)
        if outcome.skipped_share is not None:
            self._l(self.skipped).observe(outcome.skipped_share)
            self._l(self.blocks_skipped).inc(rows * outcome.skipped_share)
        if outcome.mean_lambda is not None:
            self._l(self.lam).observe(outcome.mean_lambda)
        self._l(self.batch).observe(outcome.batch_requests)

    def compiled(self, phase: str, count: int, seconds: float | None = None) -> None:
        if count:
            self._l(self.compiles, phase=phase).inc(count)
        if seconds is not None:
            self._l(self.compile_seconds).set(seconds)

    def set_fallbacks(self, count: int) -> None:
        self._l(self.fallbacks).set(count)

    def set_ready(self, ready: bool) -> None:
        self._l(self.ready).set(1.0 if ready else 0.0)

    def failed(self) -> None:
        self._l(self.errors).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
