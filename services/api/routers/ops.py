"""Operations endpoints: liveness, readiness (Redis + a fresh worker heartbeat) and metrics.

No authentication here: probes and Prometheus must reach them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from services.api import deps
from services.api.errors import RETRY_AFTER_S
from services.api.events import EventHub
from services.api.metrics import HttpMetrics, render
from services.api.schemas import Health, Readiness
from services.api.store import JobStore

# How long /readyz and /metrics wait for all their Redis reads together. A Redis that hangs
# (paused, partitioned) must not hold a probe or a scrape past its own timeout (Prometheus: 10 s
# by default): they answer "redis unavailable" / llm_redis_up 0 instead, and a scrape keeps the
# in-process HTTP metrics during the incident.
REDIS_BUDGET_S = 2.0


def _get_and_head(router: APIRouter, path: str, **kwargs: Any) -> Callable:
    """Route GET and HEAD to the handler. HEAD answers as GET without the body (RFC 9110 9.1):
    load balancers and uptime checks probe with it, and its 405 marked every replica down. It is
    left out of the spec, where it would repeat GET (and clash with its operation id)."""

    def register(endpoint: Callable) -> Callable:
        router.add_api_route(path, endpoint, methods=["GET"], **kwargs)
        router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False, **kwargs)
        return endpoint

    return register


def build_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @_get_and_head(router, "/healthz", response_model=Health)
    async def healthz() -> Health:
        """The process is alive (it checks nothing else)."""
        return Health(status="ok")

    @_get_and_head(
        router,
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready; see the fields."}},
    )
    async def readyz(store: JobStore = Depends(deps.get_store)) -> Readiness | JSONResponse:
        """Ready when Redis answers and at least one worker's heartbeat is fresh."""
        try:
            async with asyncio.timeout(REDIS_BUDGET_S):
                await store.ping()
                workers = await store.workers()
        except (RedisError, TimeoutError):
            body = Readiness(status="redis unavailable", redis=False, workers=0)
            return JSONResponse(
                body.model_dump(), 503, headers={"Retry-After": str(RETRY_AFTER_S)}
            )
        model = workers[0].get("model") if workers else None
        body = Readiness(
            status="ready" if workers else "no worker", redis=True, workers=len(workers),
            model=model,
        )  # fmt: skip
        if not workers:
            return JSONResponse(
                body.model_dump(), 503, headers={"Retry-After": str(RETRY_AFTER_S)}
            )
        return body

    @_get_and_head(
        router,
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    )
    async def metrics(
        store: JobStore = Depends(deps.get_store),
        http: HttpMetrics = Depends(deps.get_metrics),
        hub: EventHub = Depends(deps.get_events),
    ) -> Response:
        """Prometheus text format: requests, jobs by status, latency, TTFT, queue, tokens, open
        event streams (and those waiting on queued jobs), seed endpoint requests waiting, and per
        worker its model version, a version it refuses, its engine's occupancy."""
        try:
            async with asyncio.timeout(REDIS_BUDGET_S):
                stats = await store.stats()
                queue = await store.queue_depth()
                workers = await store.workers()
        except (RedisError, TimeoutError):
            stats = queue = workers = None
        body = render(
            http, stats, queue, workers, hub.open_subscriptions, hub.parked_event_streams,
            hub.open_waits,
        )  # fmt: skip
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
