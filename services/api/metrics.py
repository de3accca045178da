"""Prometheus metrics: HTTP requests counted in-process, job statistics read from Redis per scrape.

Each family's help says how to aggregate it over API replicas: the Redis-derived ones are
cluster-wide (every replica reports the same value: max), the rest per process (sum). It must
not block the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.stats import STATUSES, cumulative_buckets

# Ends each family's help: scraping every replica and summing the Redis-derived families
# multiplied them by the replica count (docs/deploy.md gives the rule and the queries).
CLUSTER_WIDE = (
    " Cluster-wide (read from Redis): every API replica reports the same value, so aggregate "
    "over replicas with max, not sum."
)
PER_PROCESS = " Per API process: sum over replicas."


class HttpMetrics:
    """Per-app registry (an app factory may build several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llm_http_requests", "HTTP requests by route and status." + PER_PROCESS,
            ["method", "route", "status"], registry=self.registry,
        )  # fmt: skip
        self.duration = Histogram(
            "llm_http_request_duration_seconds",
            "Time to the response's first byte, by route." + PER_PROCESS,
            ["route"], registry=self.registry,
        )  # fmt: skip


class MetricsMiddleware:
    """Counts every response by its route template (not the raw path: ids would explode labels).

    `routes` (the app's) label a response given before routing (a 413 from BodySizeLimit) with
    the route its request was for; without them it would be "unmatched", like a 404.
    """

    def __init__(
        self, app: ASGIApp, metrics: HttpMetrics, routes: Sequence[BaseRoute] = ()
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = _route(scope, self.routes)
                self.metrics.duration.labels(route).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route(scope, self.routes)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()


def _route(scope: Scope, routes: Sequence[BaseRoute] = ()) -> str:
    path = getattr(scope.get("route"), "path", None)
    if path:
        return path
    for route in _endpoints(routes):  # not routed (yet): the route it would have reached
        if route.matches(scope)[0] == Match.FULL:
            return getattr(route, "path", None) or "unmatched"
    return "unmatched"


def _endpoints(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes with paths, inside included routers too: FastAPI wraps each router it
    includes (`_IncludedRouter`, no path of its own; the app includes them without a prefix, so
    their routes' paths are whole)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _endpoints(inner.routes)
        else:
            yield route


# Heartbeat fields of a worker's engine, as per-worker gauges (name, help).
ENGINE_GAUGES = {
    "active": ("llm_worker_active_requests", "Requests in the worker's engine batch (decoding)."),
    "waiting": (
        "llm_worker_waiting_requests", "Requests in the worker's engine waiting for a batch slot."
    ),
    "max_batch": ("llm_worker_batch_slots", "The worker's engine batch slots (LLM_MAX_BATCH)."),
}


def worker_families(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per worker, from its heartbeat: the model version it serves, the version its alias names
    that it refuses to serve (a failed hot swap: it keeps the old one), its engine's occupancy.
    The worker label (its Celery node name) is bounded by the fleet."""
    info = GaugeMetricFamily(
        "llm_worker_model_info", "The model version the worker serves (always 1)." + CLUSTER_WIDE,
        labels=["worker", "model", "version"],
    )  # fmt: skip
    refused = GaugeMetricFamily(
        "llm_worker_refused_model",
        "1 while the worker refuses the version its model alias names (it could not load it and "
        "serves the previous one); absent otherwise." + CLUSTER_WIDE,
        labels=["worker", "version"],
    )
    engine = {
        field: GaugeMetricFamily(name, doc + CLUSTER_WIDE, labels=["worker"])
        for field, (name, doc) in ENGINE_GAUGES.items()
    }
    for beat in workers:
        worker = str(beat.get("nodename", ""))
        model = beat.get("model") or {}
        info.add_metric([worker, model.get("name") or "", model.get("version") or ""], 1.0)
        if beat.get("refused_model"):
            refused.add_metric([worker, str(beat["refused_model"].get("version") or "")], 1.0)
        for field, family in engine.items():
            if isinstance(beat.get(field), int | float):
                family.add_metric([worker], float(beat[field]))
    yield info
    yield refused
    yield from engine.values()


class _Snapshot:
    """A collector over values read from Redis just before this scrape."""

    def __init__(
        self, stats: dict[str, str] | None, queue: int | None,
        workers: list[dict[str, Any]] | None, streams: int, parked: int, waits: int,
    ) -> None:  # fmt: skip
        self.stats, self.queue, self.workers = stats, queue, workers
        self.streams, self.parked, self.waits = streams, parked, waits

    def collect(self) -> Iterable[Metric]:
        yield _gauge("llm_redis_up", "1 if Redis answered this scrape." + PER_PROCESS,
                     0.0 if self.stats is None else 1.0)
        yield _gauge("llm_event_streams_open",
                     "Event streams (SSE) this API process is serving." + PER_PROCESS,
                     self.streams)
        yield _gauge("llm_sync_waits_open",
                     "Requests to the seed's synchronous endpoints (/generate_text...) this API "
                     "process holds while their job runs." + PER_PROCESS, self.waits)
        yield _gauge("llm_event_streams_parked",
                     "Redis streams of queued jobs that this API process's event streams wait on "
                     "(read only when their job leaves the queue)." + PER_PROCESS, self.parked)
        if self.stats is None:
            return
        s = self.stats
        jobs = CounterMetricFamily(
            "llm_jobs", "Jobs by final status." + CLUSTER_WIDE, labels=["status"]
        )
        for status in STATUSES:
            jobs.add_metric([status], float(s.get(f"jobs:{status}", 0)))
        yield jobs
        tokens = CounterMetricFamily(
            "llm_tokens_generated", "Tokens generated by all workers." + CLUSTER_WIDE
        )
        tokens.add_metric([], float(s.get("tokens", 0)))
        yield tokens
        # What the workers observe: services.common.stats.finish_increments.
        for name, metric, doc in (
            ("latency", "llm_job_latency_seconds",
             "Submission to result of succeeded jobs, queue time included (failed and cancelled "
             "jobs are not observed)."),
            ("ttft", "llm_time_to_first_token_seconds",
             "Submission to first token of every job that made one, whatever its end, queue "
             "time included."),
        ):  # fmt: skip
            hist = HistogramMetricFamily(metric, doc + CLUSTER_WIDE)
            hist.add_metric([], cumulative_buckets(s, name), float(s.get(f"{name}:sum", 0.0)))
            yield hist
        if self.queue is not None:
            depth = GaugeMetricFamily(
                "llm_queue_depth",
                "Jobs queued: submitted, not yet claimed by a worker nor cancelled (the Celery "
                "list's length also counts messages of jobs cancelled while queued)."
                + CLUSTER_WIDE,
            )
            depth.add_metric([], float(self.queue))
            yield depth
        if self.workers is not None:
            workers = GaugeMetricFamily(
                "llm_workers", "Workers with a fresh heartbeat." + CLUSTER_WIDE
            )
            workers.add_metric([], float(len(self.workers)))
            yield workers
            yield from worker_families(self.workers)


def render(
    metrics: HttpMetrics,
    stats: dict[str, str] | None,
    queue: int | None,
    workers: list[dict[str, Any]] | None,
    streams: int = 0,
    parked: int = 0,
    waits: int = 0,
) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats, queue, workers, streams, parked, waits))
    return generate_latest(metrics.registry) + generate_latest(registry)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    """A gauge of one unlabelled value."""
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], float(value))
    return gauge
