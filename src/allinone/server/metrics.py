"""Prometheus metrics of one app, on the app's own registry.

A per-app :class:`~prometheus_client.CollectorRegistry` (not the process-global one) lets several
apps live in one process (tests, or two servers) without "duplicated timeseries" errors.

Series (``route`` is the route template, e.g. ``/v1/chat/completions``, so cardinality is fixed):

- ``allinone_requests_total{route, method, status}``: requests answered.
- ``allinone_request_duration_seconds{route}``: time to the end of the response (a whole
  stream for SSE), histogram.
- ``allinone_prompt_tokens_total{route}`` / ``allinone_completion_tokens_total{route}``: tokens
  in and out of chat generations.
- ``allinone_queue_depth``: requests waiting for the model (the engine queue).
- ``allinone_requests_in_flight``: model requests admitted and not finished.
- ``allinone_model_loaded``: 1 once the model is ready.
- ``allinone_kv_cache_tokens``: token positions held in the KV cache (running and cached sequences).
- ``allinone_kv_prefix_hit_ratio``: share of all prompt tokens so far that came from the KV cache
  instead of being computed (task prefixes, conversations).
- ``allinone_active_replies``: replies being decoded now.
- ``allinone_batch_size_total{size}``: score and encode batches run, by how many jobs each held.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from ..engine import EngineStats

# Sentiment takes ~0.2-0.5 s on the embedded model, a chat reply several seconds.
_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The app's metric objects.

    Args:
        stats: returns the model's :class:`~allinone.engine.EngineStats` now (or None while it
            loads).
        in_flight: returns the number of admitted model requests now.
        model_loaded: returns whether the model is ready.
    """

    def __init__(self, *, stats: Callable[[], "EngineStats | None"], in_flight: Callable[[], float],
                 model_loaded: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("allinone_requests", "HTTP requests answered", ["route", "method", "status"],
                                registry=reg)
        self.latency = Histogram("allinone_request_duration_seconds", "Time to the end of the response",
                                 ["route"], buckets=_BUCKETS, registry=reg)
        self.prompt_tokens = Counter("allinone_prompt_tokens", "Prompt tokens read by chat generations (in)",
                                     ["route"], registry=reg)
        self.completion_tokens = Counter("allinone_completion_tokens", "Tokens generated (out)", ["route"],
                                         registry=reg)

        def figure(fn: Callable[["EngineStats"], float]) -> Callable[[], float]:
            return lambda: float(fn(s)) if (s := stats()) is not None else 0.0

        Gauge("allinone_queue_depth", "Requests waiting for the model", registry=reg).set_function(
            figure(lambda s: s.queue_depth))
        Gauge("allinone_requests_in_flight", "Model requests admitted and not finished",
              registry=reg).set_function(in_flight)
        Gauge("allinone_model_loaded", "1 once the model is ready", registry=reg).set_function(
            lambda: float(model_loaded()))
        Gauge("allinone_active_replies", "Replies being decoded now", registry=reg).set_function(
            figure(lambda s: s.active_replies))
        Gauge("allinone_kv_cache_tokens", "Token positions held in the KV cache", registry=reg).set_function(
            figure(lambda s: s.kv_used_tokens))
        Gauge("allinone_kv_prefix_hit_ratio", "Share of prompt tokens taken from the KV cache",
              registry=reg).set_function(figure(lambda s: s.prefix_hit_ratio))
        reg.register(_BatchSizes(stats))

    def count_tokens(self, route: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.labels(route).inc(prompt_tokens)
        self.completion_tokens.labels(route).inc(completion_tokens)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _BatchSizes:
    """``allinone_batch_size_total{size}``: score and encode batches run, by how many jobs each held."""

    def __init__(self, stats: Callable[[], "EngineStats | None"]) -> None:
        self._stats = stats

    def collect(self):
        family = CounterMetricFamily("allinone_batch_size", "Score/encode batches run, by size", labels=["size"])
        current = self._stats()
        for size, count in sorted((current.batch_sizes if current is not None else {}).items()):
            family.add_metric([str(size)], count)
        yield family


class MetricsMiddleware:
    """Pure ASGI middleware (unlike ``BaseHTTPMiddleware`` it does not buffer SSE streams) that
    counts every HTTP request and times it to the end of its response body."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app raises before starting a response, the error handler sends a 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
