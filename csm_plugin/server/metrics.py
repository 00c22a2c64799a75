"""Prometheus metrics of one server process, in a registry of its own (several apps can live in
one process, as in the tests)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
_FRAME_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.4, 0.8, 1.6)
_RTF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ready = Gauge("csm_ready", "1 once the model is loaded and warmed, 0 while loading or draining", registry=r)
        self.active_streams = Gauge("csm_active_streams", "replies being generated now", registry=r)
        self.connections = Gauge("csm_open_connections", "open WebSocket conversation streams", registry=r)
        self.conversations = Gauge("csm_conversations", "conversations the server holds (attached or not)", registry=r)
        self.streams = Counter("csm_streams", "replies by outcome", ["outcome"], registry=r)
        self.queued = Gauge("csm_queued_replies", "replies waiting for a place to generate", registry=r)
        self.behind = Gauge("csm_replies_behind", "replies whose reader has fallen behind real time", registry=r)
        self.queue_wait = Histogram(
            "csm_queue_wait_seconds", "from a speak request to its place (admitted replies)", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.time_to_first_audio = Histogram(
            "csm_time_to_first_audio_seconds", "from a speak request to its first audio sent", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.frame_interval = Histogram(
            "csm_frame_interval_seconds", "time between consecutive 80 ms frames of a reply", buckets=_FRAME_BUCKETS, registry=r
        )
        self.real_time_factor = Histogram(
            "csm_real_time_factor", "generation time / audio duration per reply (below 1 is faster than real time)",
            buckets=_RTF_BUCKETS, registry=r,
        )
        self.audio_seconds = Counter("csm_audio_seconds", "seconds of audio sent", registry=r)
        self.errors = Counter("csm_errors", "errors answered to clients, by code", ["code"], registry=r)
        self.requests = Counter("csm_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)

    def watch_worker(self, worker: Callable[[], object | None]) -> None:
        """Export the inference worker's preemption figures, read when /metrics is scraped."""
        self.registry.register(_WorkerCollector(worker))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerCollector:
    """Slow readers' streams that gave their cache slot to a waiting reply (engine/preempt.py)."""

    def __init__(self, worker: Callable[[], object | None]):
        self._worker = worker

    def describe(self):
        return []  # collected only when scraped: the worker may not exist yet

    def collect(self):
        worker = self._worker()
        yield GaugeMetricFamily(
            "csm_suspended_streams", "replies whose reader fell behind and that gave their cache slot to a waiting reply",
            value=getattr(worker, "suspended", 0),
        )
        yield CounterMetricFamily(
            "csm_stream_suspensions", "replies suspended for a waiting reply so far", value=getattr(worker, "suspensions", 0)
        )
