"""The API's Redis client (services.api.app.make_redis) under more commands than connections."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.api.app import make_redis
from services.common.settings import Settings
from tests.helpers.redis_server import redis_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with redis_server(tmp_path_factory.mktemp("redis"), appendonly=False) as srv:
        yield srv


async def blocked_clients(admin: Any, n: int, timeout_s: float = 10.0) -> None:
    """Wait until Redis reports exactly n clients blocked (in BLPOP and the like)."""
    deadline = time.monotonic() + timeout_s
    while (blocked := (await admin.info("clients"))["blocked_clients"]) != n:
        assert time.monotonic() < deadline, f"{blocked} blocked clients, not {n}"
        await asyncio.sleep(0.01)


def hold_a_connection(redis: Any, i: int) -> Any:
    return redis.blpop([f"pool-test-{i}"], timeout=0.2)  # holds its connection for 0.2 s


def test_a_burst_over_the_pool_size_waits_for_connections_instead_of_failing(server: Any) -> None:
    async def test() -> None:
        settings = Settings(redis_url=server.url)  # the default pool size
        redis = make_redis(settings)
        burst = settings.redis_max_connections + 50
        try:
            results = await asyncio.gather(*(hold_a_connection(redis, i) for i in range(burst)))
            assert results == [None] * burst  # every BLPOP ran (and timed out empty)
        finally:
            await redis.aclose()

    asyncio.run(test())


def test_a_command_that_gets_no_connection_in_time_fails_as_a_redis_error(server: Any) -> None:
    async def test() -> None:
        settings = Settings(redis_url=server.url, redis_max_connections=2, redis_pool_timeout_s=0.1)
        redis = make_redis(settings)
        admin = aioredis.Redis.from_url(server.url)  # its own connections, outside that pool
        try:
            held = [asyncio.create_task(redis.blpop(["pool-held"], timeout=5)) for _ in range(2)]
            # Both pool connections are taken once Redis has both BLPOPs blocked.
            await blocked_clients(admin, 2)
            with pytest.raises(RedisError):  # the API turns it into 503 + Retry-After
                await redis.ping()
            await admin.rpush("pool-held", "a", "b")  # release them
            assert sorted(v for _, v in await asyncio.gather(*held)) == ["a", "b"]
        finally:
            await redis.aclose()
            await admin.aclose()

    asyncio.run(test())
