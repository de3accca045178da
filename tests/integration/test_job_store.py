"""services.api.store.JobStore against a real Redis: what a failed step leaves behind."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from services.api.store import PENDING_IDEMPOTENCY_S, JobStore
from services.common import keys
from services.common.jobs import JobRecord, JobRequest
from services.common.settings import Settings
from tests.helpers.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.integration

JOB_TTL_S = 3600


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(Path(tmp_path_factory.mktemp("store")), appendonly=False) as srv:
        yield srv


def with_store(server: RedisServer, test: Any) -> None:
    async def run() -> None:
        redis = Redis.from_url(server.url, decode_responses=True)
        try:
            await test(redis, JobStore(redis, Settings(redis_url=server.url, job_ttl_s=JOB_TTL_S)))
        finally:
            await redis.aclose()

    asyncio.run(run())


def test_an_idempotency_key_whose_job_was_never_created_frees_itself_soon(
    server: RedisServer,
) -> None:
    # The create failed and so did the release (Redis away): a retry with the same key is
    # refused as "in progress" only until the short pending binding expires, not for a day.
    async def test(redis: Redis, store: JobStore) -> None:
        assert await store.claim_idempotency("p:lost", "digest", "job-never-created") is None
        assert 0 < await redis.ttl(keys.idempotency("p:lost")) <= PENDING_IDEMPOTENCY_S

    with_store(server, test)


def test_an_idempotency_key_lives_as_long_as_the_job_it_created(server: RedisServer) -> None:
    async def test(redis: Redis, store: JobStore) -> None:
        assert await store.claim_idempotency("p:made", "digest", "job-made") is None
        await store.create(JobRecord.new("job-made", JobRequest(prompt="a")), "{}", "p:made")
        assert await redis.ttl(keys.idempotency("p:made")) > PENDING_IDEMPOTENCY_S
        assert await redis.ttl(keys.job("job-made")) > PENDING_IDEMPOTENCY_S
        hit = await store.claim_idempotency("p:made", "digest", "job-other")
        assert hit is not None and hit.job_id == "job-made"

    with_store(server, test)
