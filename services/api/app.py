"""The API's app factory: `uvicorn services.api.app:create_app --factory`.

Wires settings, the asyncio Redis client, the Celery message builder, middleware, routers; it must
not load a model or generate text.
"""

from __future__ import annotations

import logging

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from services.api.errors import install_error_handlers
from services.api.events import EventHub
from services.api.limits import BodySizeLimit
from services.api.metrics import HttpMetrics, MetricsMiddleware
from services.api.model_limits import ModelLimitsCache
from services.api.routers import compat, jobs, ops
from services.api.store import JobStore
from services.common.celery_config import make_celery
from services.common.settings import Settings

log = logging.getLogger(__name__)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """The API's own loggers (`services.*`) to stderr with time, level and logger name.

    uvicorn configures only its own loggers, which do not propagate: without this the API's
    warnings went through Python's last-resort handler (a bare message) and its INFO lines
    nowhere. Logging configured already (a handler on `services` or the root: uvicorn's
    --log-config, pytest) is left as it is.
    """
    logger = logging.getLogger("services")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)


# The API pool's read timeout. Its commands are all quick (the event hub's blocking XREAD has a
# client of its own), so 2 s is far above any normal reply, even on a loaded machine.
REDIS_SOCKET_TIMEOUT_S = 2.0


def make_redis(settings: Settings) -> Redis:
    # Short timeouts, and two quick retries of a cut connection: a restarted Redis is picked up on
    # the next request (stale pooled connections are replaced), a dead one answers 503 in well
    # under 1 s. A Redis that stops answering without closing the connection (paused, a network
    # partition) fails each command after REDIS_SOCKET_TIMEOUT_S, and that timeout is not retried:
    # each retry reconnected into the hung server's listen backlog and waited again, and with a
    # 10 s timeout one call took ~90 s before it answered 503 (far past a scrape's or an
    # ingress's timeout).
    # A blocking pool: with redis-py's default pool the 101st command in flight fails at once
    # (MaxConnectionsError), so a burst of requests or of event-stream checks got 503s.
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_s,
        decode_responses=True,
        socket_connect_timeout=1.0,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        health_check_interval=15,
        retry=Retry(
            ExponentialBackoff(cap=0.25, base=0.05), retries=2,
            supported_errors=(RedisConnectionError,),
        ),
    )
    return Redis.from_pool(pool)


def make_stream_reader(settings: Settings) -> Redis:
    """The event hub's own client: one connection, no retries, so a reconnect happens only where
    the hub sees the error and asks the new connection's id (CLIENT UNBLOCK names it)."""
    return Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        single_connection_client=True,
        socket_connect_timeout=1.0,
        socket_timeout=10.0,  # above the hub's XREAD block (at most 2 s): a hung Redis ends
        # the open streams after 10 s, and their clients' reconnects meet the pool's 2 s timeout
        retry=Retry(NoBackoff(), 0),
    )


async def count_queued_jobs_of_older_apis(store: JobStore) -> None:
    """At start-up: `llm_queue_depth` counts the jobs an API older than it queued (an upgrade).
    The API starts whether or not Redis answers."""
    try:
        added = await store.add_missing_queued()
    except RedisError as exc:
        log.warning("llm_queue_depth may miss jobs queued by an older API: %s", exc)
        return
    if added:
        log.info("llm_queue_depth: %d queued job(s) found in the Celery list", added)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = make_redis(settings)
        app.state.store = JobStore(redis, settings)
        await count_queued_jobs_of_older_apis(app.state.store)
        app.state.events = EventHub(redis, make_stream_reader(settings))
        try:
            yield
        finally:
            await app.state.events.close()
            await redis.aclose()

    app = FastAPI(
        title="llm-pipeline API",
        version="0.1.0",
        summary="Queue text generation jobs, poll or stream them; workers run the model.",
        lifespan=lifespan,
        # No redirect for a trailing slash: its Location is absolute, with the scheme uvicorn
        # sees, so behind a TLS proxy `POST https://.../jobs/` went to http:// (clients dropped
        # the key or resent the prompt in clear). No route has a slash form: it is a 404.
        redirect_slashes=False,
    )
    app.state.settings = settings
    if not settings.api_keys:  # say so: an empty key Secret opens the job endpoints too
        log.warning("LLM_API_KEYS is empty: the job endpoints take requests without a key")
    # Builds task messages only (JSON); the store pushes them, so Celery opens no connection.
    app.state.celery = make_celery(settings, main="llm-api")
    app.state.metrics = HttpMetrics()
    app.state.model_limits = ModelLimitsCache()
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Outermost: counts 413s, under the route they were sent to (the router's list, filled below).
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, routes=app.router.routes)
    install_error_handlers(app)
    app.include_router(jobs.build_router(settings))
    app.include_router(compat.build_router(settings))
    app.include_router(ops.build_router())
    return app
