"""Job records, idempotency keys, the queue and stats in Redis, through `redis.asyncio`.

Everything the API reads or writes in Redis goes through JobStore (the Celery message it pushes
is built by queue.py), but the token streams, which services/api/events.py reads; it must not
know about HTTP.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from services.api.memory import MemoryWatermark
from services.common import keys, lua_scripts
from services.common.jobs import JobRecord, JobStatus
from services.common.redis_memory import MemoryUse
from services.common.settings import Settings


@dataclass(frozen=True)
class IdempotencyHit:
    job_id: str
    fingerprint: str


PENDING_IDEMPOTENCY_S = 30  # an Idempotency-Key bound before its job's record exists
QUEUE_DEPTH_CHECKS = 1_000  # queued jobs whose records one depth read checks, oldest first
MESSAGES_PER_READ = 1_000  # Celery messages per LRANGE when the start-up looks for queued jobs


LAST_ENTRY_PART = 2**64 - 1  # a stream entry id is two unsigned 64-bit numbers


def _task_id(message: str) -> str | None:
    """The task id (its job's id) of a Celery message as kombu's Redis transport stores it."""
    try:
        task_id = json.loads(message)["headers"]["id"]
    except (ValueError, TypeError, KeyError):
        return None
    return task_id if isinstance(task_id, str) else None


def _is_last_entry_id(entry_id: str) -> bool:
    """Whether `entry_id` is the largest id a Redis stream can hold (no entry comes after it)."""
    parts = entry_id.split("-")
    return len(parts) == 2 and all(int(part) == LAST_ENTRY_PART for part in parts)


class JobStore:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.ttl_s = settings.job_ttl_s
        self._create = redis.register_script(lua_scripts.CREATE)
        self._release_idempotency = redis.register_script(lua_scripts.RELEASE_IDEMPOTENCY)
        self._cancel = redis.register_script(lua_scripts.CANCEL)
        self._fresh_workers = redis.register_script(lua_scripts.FRESH_WORKERS)
        self._queue_depth = redis.register_script(lua_scripts.QUEUE_DEPTH)
        self._add_queued = redis.register_script(lua_scripts.ADD_QUEUED)
        self.memory_watermark = MemoryWatermark(self.memory_use, settings.redis_memory_watermark)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def memory_use(self) -> MemoryUse:
        """Redis's used_memory, maxmemory and eviction policy (INFO memory)."""
        return MemoryUse.from_info(await self.redis.info("memory"))

    async def get(self, job_id: str) -> JobRecord | None:
        data = await self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_hash(data) if data else None

    async def status(self, job_id: str) -> JobStatus | None:
        """The job's status alone (one field, no parsing): what an idle event stream checks."""
        value = await self.redis.hget(keys.job(job_id), "status")
        return JobStatus(value) if value else None

    async def events_after(self, job_id: str, after: str) -> list[tuple[str, dict[str, str]]]:
        """The entries of the job's stream after id `after`, oldest first."""
        if _is_last_entry_id(after):
            return []  # nothing follows it, and Redis refuses a range that starts past it
        return await self.redis.xrange(keys.events(job_id), min=f"({after}")

    async def create(self, record: JobRecord, message: str, idempotency: str | None = None) -> None:
        """Write the record and push its Celery message atomically: both or neither.
        The Idempotency-Key binding claimed for it, if any, then lives as long as the record.

        One script that does nothing when the record exists already, so redis-py's retry of a
        call whose reply was lost (the API's client retries twice) changes nothing.
        """
        job_keys = [keys.job(record.id), keys.QUEUE, keys.QUEUED]
        if idempotency is not None:
            job_keys.append(keys.idempotency(idempotency))
        fields = [item for pair in record.to_hash().items() for item in pair]
        await self._create(keys=job_keys, args=[self.ttl_s, message, *fields])

    async def claim_idempotency(
        self, key: str, fingerprint: str, job_id: str
    ) -> IdempotencyHit | None:
        """Bind key -> (fingerprint, job_id) unless bound already; return the earlier binding.

        The binding lasts PENDING_IDEMPOTENCY_S until `create` extends it with its record: if
        the create fails and the release fails too (Redis away), a retry with the same key is
        refused as in progress for that long, not for the record's whole TTL. A binding that
        names job_id is this call's own: redis-py sent the SET again after losing its reply.
        """
        value = json.dumps({"fingerprint": fingerprint, "job_id": job_id})
        if await self.redis.set(keys.idempotency(key), value, nx=True, ex=PENDING_IDEMPOTENCY_S):
            return None
        hit = await self.idempotency_binding(key)
        if hit is None:  # expired between the two calls: try once more
            return await self.claim_idempotency(key, fingerprint, job_id)
        return None if hit.job_id == job_id else hit

    async def idempotency_binding(self, key: str) -> IdempotencyHit | None:
        """The job bound to an Idempotency-Key, if any: a read, for when new jobs are refused."""
        raw = await self.redis.get(keys.idempotency(key))
        if raw is None:
            return None
        bound = json.loads(raw)
        return IdempotencyHit(bound["job_id"], bound["fingerprint"])

    async def release_idempotency(self, key: str, job_id: str) -> bool:
        """Free the key claimed for job_id unless that job's record exists (-> whether freed).

        For a create that raised: a lost reply leaves it unknown whether the job was made, and a
        job that was keeps its key, so the client's retry gets it instead of a second job.
        """
        freed = await self._release_idempotency(
            keys=[keys.idempotency(key), keys.job(job_id)], args=[job_id]
        )
        return bool(freed)

    async def cancel(self, job_id: str) -> str:
        """Cancel atomically: 'missing', 'cancelled' (was queued), 'running' (flagged) or final."""
        return await self._cancel(
            keys=[keys.job(job_id), keys.events(job_id), keys.STATS, keys.LEFT_QUEUE,
                  keys.QUEUED],
            args=[repr(time.time()), self.ttl_s, job_id],
        )

    async def queue_depth(self) -> int:
        """Jobs `queued`: neither claimed nor cancelled yet. Not the Celery list's length, which
        also counts the messages of jobs cancelled while queued until a worker pops them.

        Checks the records of the oldest QUEUE_DEPTH_CHECKS first, and stops counting those
        that expired unclaimed or left `queued` through a pod older than the count (a rolling
        upgrade): those are the oldest, the first popped and the first to expire.
        """
        depth = await self._queue_depth(keys=[keys.QUEUED],
                                        args=[keys.job(""), QUEUE_DEPTH_CHECKS])  # fmt: skip
        return int(depth)

    async def add_missing_queued(self) -> int:
        """Count the queued jobs an API older than the count created (their messages wait in
        the Celery list); run at start-up. Reads the list, not the keyspace, from the end new
        messages are pushed to, so none is missed while it moves; skips what is not a Celery
        message. -> how many jobs it added."""
        added, start = 0, 0
        while True:
            messages = await self.redis.lrange(keys.QUEUE, start, start + MESSAGES_PER_READ - 1)
            ids = [job_id for message in messages if (job_id := _task_id(message))]
            if ids:
                added += await self._add_queued(keys=[keys.QUEUED], args=[keys.job(""), *ids])
            if len(messages) < MESSAGES_PER_READ:
                return added
            start += MESSAGES_PER_READ

    async def workers(self) -> list[dict[str, Any]]:
        """Workers whose heartbeat key has not expired."""
        beats = await self._fresh_workers(keys=[keys.WORKERS], args=[keys.worker("")])
        return [json.loads(beat) for beat in beats]

    async def stats(self) -> dict[str, str]:
        return await self.redis.hgetall(keys.STATS)

    async def current_model(self) -> dict[str, str]:
        return await self.redis.hgetall(keys.MODEL_CURRENT)

    async def tokenizer_json(self, digest: str) -> str | None:
        return await self.redis.get(keys.tokenizer(digest))
