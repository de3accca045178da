"""Redis's memory read as Redis's own maxmemory check reads it."""

from __future__ import annotations

import asyncio

import pytest

from services.common.redis_memory import MemoryUse

pytestmark = pytest.mark.unit
MB = 1 << 20


def test_the_aof_buffer_of_a_busy_disk_does_not_count_toward_the_cap() -> None:
    """Redis leaves it out of its own check: with 4 MB of it waiting for the disk, a raw
    used_memory read 10 MB of a 7 MB cap, "full", while Redis took every write."""
    info = {"used_memory": 10 * MB, "mem_not_counted_for_evict": 4 * MB, "maxmemory": 7 * MB,
            "maxmemory_policy": "noeviction"}  # fmt: skip
    use = MemoryUse.from_info(info)
    assert use.used == 6 * MB
    assert not use.over(1.0) and use.over(0.85) and not use.over(0.9)


@pytest.mark.parametrize(("cap", "policy", "over"), [
    (0, "noeviction", False),  # no cap: never full
    (8 * MB, "allkeys-lru", False),  # evicts instead of refusing
    (8 * MB, "noeviction", True),
])
def test_only_a_capped_noeviction_redis_is_ever_over(cap: int, policy: str, over: bool) -> None:
    info = {"used_memory": 8 * MB, "maxmemory": cap, "maxmemory_policy": policy}
    assert MemoryUse.from_info(info).over(0.9) is over


def test_a_kept_read_failure_is_raised_afresh_to_each_request() -> None:
    """The one object re-raised to every request chained each request's frames onto its
    traceback: 3,000 frames, and the requests' frames kept alive, after 1,000 requests."""
    import traceback

    from redis.exceptions import TimeoutError as RedisTimeout

    from services.api.memory import MemoryWatermark

    async def hung() -> MemoryUse:
        raise RedisTimeout("Timeout reading from socket")

    async def depths() -> list[int]:
        watermark, seen = MemoryWatermark(hung, 0.9, max_age_s=60), []
        for _ in range(20):
            try:
                await watermark.check()
            except RedisTimeout as exc:
                seen.append(len(traceback.extract_tb(exc.__traceback__)))
        return seen

    seen = asyncio.run(depths())
    assert len(set(seen[1:])) == 1, seen  # the same depth each time, not one more each time
