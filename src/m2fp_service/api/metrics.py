"""Prometheus metrics (prometheus-client), one registry per app so tests can build many apps.

Exposed at ``GET /metrics``:

- ``m2fp_http_requests_total{route,method,status}`` and
  ``m2fp_http_request_duration_seconds{route,method}``: every HTTP request, by route template;
- ``m2fp_stage_duration_seconds{stage}``: decode, preprocess, infer, postprocess, encode of each parse;
- ``m2fp_queue_wait_seconds``: time a parse waited for a worker;
- ``m2fp_queue_depth`` (admitted parses not running yet: uploading or queued),
  ``m2fp_workers_busy`` (running jobs),
  ``m2fp_http_requests_in_flight`` (HTTP requests being served);
- ``m2fp_rejected_total{reason}``: parses refused as overloaded or timed out;
- ``m2fp_model_ready``, ``m2fp_model_trained``: 1/0.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from m2fp_service.timings import STAGES, Timings

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Requests span 5 ms (health checks) to a minute (a full-size model on a big photo, queued).
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)


class Metrics:
    """The service's collectors, bound to their own ``CollectorRegistry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("m2fp_http_requests", "HTTP requests by route template, method and status",
                                ("route", "method", "status"), registry=r)
        self.latency = Histogram("m2fp_http_request_duration_seconds", "HTTP request duration, seconds",
                                 ("route", "method"), buckets=_REQUEST_BUCKETS, registry=r)
        self.in_flight = Gauge("m2fp_http_requests_in_flight", "HTTP requests being served", registry=r)
        self.stages = Histogram("m2fp_stage_duration_seconds", "Seconds per pipeline stage of one parse",
                                ("stage",), buckets=_STAGE_BUCKETS, registry=r)
        self.queue_wait = Histogram("m2fp_queue_wait_seconds", "Seconds a parse waited for a worker",
                                    buckets=_STAGE_BUCKETS, registry=r)
        self.queue_depth = Gauge("m2fp_queue_depth", "Admitted parses not running yet (uploading or queued)",
                                 registry=r)
        self.workers_busy = Gauge("m2fp_workers_busy", "Parses running on a worker", registry=r)
        self.rejected = Counter("m2fp_rejected", "Parses refused: overloaded or timed out", ("reason",), registry=r)
        self.model_ready = Gauge("m2fp_model_ready", "1 when the model is loaded and warm", registry=r)
        self.model_trained = Gauge("m2fp_model_trained", "1 for trained weights, 0 for an untrained demo model",
                                   registry=r)
        for stage in STAGES:
            self.stages.labels(stage)
        for reason in ("overloaded", "timeout"):
            self.rejected.labels(reason)

    def bind_pool(self, waiting: Callable[[], float], running: Callable[[], float]) -> None:
        """Reads queue depth and busy workers from the pool at scrape time."""
        self.queue_depth.set_function(waiting)
        self.workers_busy.set_function(running)

    def request_started(self) -> None:
        self.in_flight.inc()

    def request_finished(self, route: str, method: str, status: int, seconds: float) -> None:
        self.in_flight.dec()
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def observe_parse(self, timings: Timings, queue_wait_s: float) -> None:
        for stage, seconds in timings.seconds.items():
            self.stages.labels(stage).observe(seconds)
        self.queue_wait.observe(queue_wait_s)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
