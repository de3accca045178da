"""Admission by Redis memory: new jobs are refused once Redis's used_memory reaches a watermark
(LLM_REDIS_MEMORY_WATERMARK, a fraction of its maxmemory), below the hard cap.

At maxmemory under noeviction Redis refuses every client's writes, the workers' too: a worker
that popped a queued job's message could not record it as unacked (the job was lost), its
heartbeat expired, and a finished job stayed `running`. Stopping new jobs below the cap leaves
the workers room to finish the queued ones. Reads INFO memory at most once per MAX_AGE_S.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import ResponseError

from services.common.redis_memory import NO_CAP, MemoryUse

log = logging.getLogger(__name__)
MAX_AGE_S = 1.0  # a burst of submissions past the watermark is at most this long


class RedisNearlyFull(Exception):
    """Redis is past the watermark: the API answers 503 with Retry-After."""

    def __init__(self, use: MemoryUse, fraction: float) -> None:
        super().__init__(
            f"Redis is nearly full ({use.used / use.cap:.0%} of its maxmemory): no new jobs until "
            f"it is below {fraction:.0%} (LLM_REDIS_MEMORY_WATERMARK), which leaves the workers "
            "room to finish the queued ones; retry later"
        )


class MemoryWatermark:
    def __init__(
        self, read: Callable[[], Awaitable[MemoryUse]], fraction: float,
        max_age_s: float = MAX_AGE_S,
    ) -> None:  # fmt: skip
        self._read = read
        self.fraction = fraction
        self.max_age_s = max_age_s
        self._use = NO_CAP
        self._error: Exception | None = None  # the last read's failure, kept as its reading
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()  # one INFO per refresh, however many requests wait on it
        self._over = False
        self._warned_denied = False

    async def check(self) -> None:
        """RedisNearlyFull past the watermark; a RedisError if Redis cannot be read."""
        use = await self.current()
        over = use.over(self.fraction)
        if over != self._over:  # log the transitions, not every refused request
            self._over = over
            if over:
                log.warning("Redis at %d of %d bytes (maxmemory): new jobs are refused until it "
                            "is below %g of it", use.used, use.cap, self.fraction)  # fmt: skip
            else:
                log.info("Redis below %g of its maxmemory again: new jobs are taken", self.fraction)
        if over:
            raise RedisNearlyFull(use, self.fraction)

    async def current(self) -> MemoryUse:
        """The last reading while it is fresh, else a new one. A failed read is kept as long:
        with Redis hung each INFO waits out the socket timeout (2 s), and the requests queued
        behind the lock took 2 s each in turn (the tenth 20 s) instead of all failing at once."""
        if not self._fresh():
            async with self._lock:
                if not self._fresh():
                    try:
                        self._use, self._error = await self._read_or_no_cap(), None
                    except Exception as exc:
                        self._error = exc
                    self._read_at = time.monotonic()
        if self._error is not None:
            # A copy per request: re-raising the one object chained every request's frames
            # onto its traceback (3,000 frames after 1,000 requests).
            raise copy.copy(self._error)
        return self._use

    def _fresh(self) -> bool:
        return time.monotonic() - self._read_at < self.max_age_s

    async def _read_or_no_cap(self) -> MemoryUse:
        try:
            return await self._read()
        except ResponseError as exc:
            # INFO renamed or denied (a managed Redis, an ACL): admit as before, at the cap's
            # refusal, rather than refuse every job. A connection error still propagates (503).
            if not self._warned_denied:
                self._warned_denied = True
                log.warning("Redis refused INFO memory (%s): LLM_REDIS_MEMORY_WATERMARK is not "
                            "applied", exc)  # fmt: skip
            return NO_CAP
