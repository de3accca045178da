"""services.api.store.JobStore against a real Redis: what a failed step leaves behind.

Lost replies are real: a TCP proxy (tests/helpers/lossy_proxy.py) lets Redis run a command and
cuts the connection before its reply, and the API's own client (make_redis, with its Retry)
sends it again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from fastapi import HTTPException
from redis.asyncio import Redis

from services.api.app import make_redis
from services.api.model_limits import ModelLimitsCache
from services.api.queue import task_message
from services.api.store import PENDING_IDEMPOTENCY_S, JobStore
from services.api.submit import submit_job
from services.common import keys, lua_scripts
from services.common.celery_config import make_celery
from services.common.jobs import JobRecord, JobRequest
from services.common.settings import Settings
from tests.helpers.lossy_proxy import ReplyLosingProxy
from tests.helpers.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.integration

JOB_TTL_S = 7200  # above LLM_VISIBILITY_TIMEOUT_S + LLM_JOB_TIME_LIMIT_S (3600 + 600)


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


def test_idempotency_binding_lives_as_long_as_its_record(server: RedisServer) -> None:
    # The record's TTL restarts when a worker claims the job and when it finishes; the binding
    # used to keep the TTL it got at create, so it died first (by the time the job waited in the
    # queue and ran), and the same key and body then made a second job of a readable one.
    async def test(redis: Redis, store: JobStore) -> None:
        job_id, idem = "job-long-lived", keys.idempotency("p:long")
        claim = redis.register_script(lua_scripts.CLAIM)
        finish = redis.register_script(lua_scripts.FINISH)
        assert await store.claim_idempotency("p:long", "digest", job_id) is None
        await store.create(JobRecord.new(job_id, JobRequest(prompt="a")), "{}", "p:long")

        async def age(by_s: int) -> None:  # as if by_s seconds went by
            for key in (keys.job(job_id), idem):
                await redis.expire(key, await redis.ttl(key) - by_s)

        await age(JOB_TTL_S - 100)  # waited in the queue for most of the TTL
        await claim(**lua_scripts.claim_call(job_id, "w1", now=time.time(), lease_ttl_s=30,
                                             ttl_s=JOB_TTL_S))  # fmt: skip
        assert await redis.ttl(keys.job(job_id)) > JOB_TTL_S - 5
        assert await redis.ttl(idem) >= await redis.ttl(keys.job(job_id)) - 1

        await age(JOB_TTL_S - 100)  # ran for most of it
        await finish(
            keys=[keys.job(job_id), keys.events(job_id), keys.lease(job_id), keys.STATS],
            args=lua_scripts.finish_args("w1", "succeeded", JOB_TTL_S, {}, {}, {}),
        )
        assert await redis.ttl(keys.job(job_id)) > JOB_TTL_S - 5
        assert await redis.ttl(idem) >= await redis.ttl(keys.job(job_id)) - 1
        hit = await store.claim_idempotency("p:long", "digest", "job-second")
        assert hit is not None and hit.job_id == job_id

    with_store(server, test)


def test_cancelling_a_job_that_waited_long_restarts_its_records_and_bindings_ttl(
    server: RedisServer,
) -> None:
    # The cancel makes a queued job final and restarted its events stream's TTL only: a job
    # that waited in the queue for most of its TTL then vanished moments later (GET answered
    # 404, the stream lived on alone) and its Idempotency-Key made a second job.
    async def test(redis: Redis, store: JobStore) -> None:
        job_id, idem = "job-cancelled-late", keys.idempotency("p:cancelled-late")
        assert await store.claim_idempotency("p:cancelled-late", "digest", job_id) is None
        await store.create(JobRecord.new(job_id, JobRequest(prompt="a")), "{}",
                           "p:cancelled-late")  # fmt: skip
        for key in (keys.job(job_id), idem):  # as if it had waited all but 5 s of its TTL
            await redis.expire(key, 5)
        assert await store.cancel(job_id) == "cancelled"
        assert await redis.ttl(keys.job(job_id)) > JOB_TTL_S - 5
        assert await redis.ttl(idem) > JOB_TTL_S - 5
        assert await redis.ttl(keys.events(job_id)) > JOB_TTL_S - 5

    with_store(server, test)


def test_a_binding_that_names_another_job_keeps_its_own_ttl(server: RedisServer) -> None:
    # The key was bound again after the old binding expired: the old job's claim leaves it be.
    async def test(redis: Redis, store: JobStore) -> None:
        claim = redis.register_script(lua_scripts.CLAIM)
        await store.create(JobRecord.new("job-old", JobRequest(prompt="a")), "{}", "p:rebound")
        await redis.set(keys.idempotency("p:rebound"),
                        json.dumps({"fingerprint": "d", "job_id": "job-new"}), ex=50)
        await claim(**lua_scripts.claim_call("job-old", "w1", now=time.time(), lease_ttl_s=30,
                                             ttl_s=JOB_TTL_S))  # fmt: skip
        assert 0 < await redis.ttl(keys.idempotency("p:rebound")) <= 50

    with_store(server, test)


def test_the_queue_depth_counts_only_jobs_neither_claimed_nor_cancelled(
    server: RedisServer,
) -> None:
    # It read the Celery list's length, where a job cancelled while queued keeps its message
    # until a worker pops it: dashboards showed a backlog of jobs that would never run.
    async def test(redis: Redis, store: JobStore) -> None:
        claim = redis.register_script(lua_scripts.CLAIM)
        before = await store.queue_depth()
        for job_id in ("depth-waits", "depth-cancelled", "depth-claimed", "depth-gone"):
            await store.create(JobRecord.new(job_id, JobRequest(prompt="a")), "{}")
        assert await store.queue_depth() == before + 4
        assert await store.cancel("depth-cancelled") == "cancelled"
        await redis.delete(keys.job("depth-gone"))  # its record expired before any claim
        for job_id, reply in (("depth-claimed", "claimed"), ("depth-gone", "missing")):
            called = await claim(**lua_scripts.claim_call(job_id, "w1", now=time.time(),
                                                          lease_ttl_s=30,
                                                          ttl_s=JOB_TTL_S))  # fmt: skip
            assert called[0] == reply
        assert await store.queue_depth() == before + 1

    with_store(server, test)


def test_a_job_whose_record_expired_while_queued_is_no_longer_counted(
    server: RedisServer,
) -> None:
    # No worker claimed it for a whole TTL: its record is gone and it will never run, though
    # nothing removed it from the queued jobs (no claim, no cancel).
    async def test(redis: Redis, store: JobStore) -> None:
        before = await store.queue_depth()
        stale = JobRecord.new("depth-expired", JobRequest(prompt="a"))
        stale.created_at = time.time() - JOB_TTL_S - 1  # submitted a TTL ago
        await store.create(stale, "{}")
        await redis.delete(keys.job(stale.id))  # as its TTL would have
        await store.create(JobRecord.new("depth-fresh", JobRequest(prompt="a")), "{}")
        assert await store.queue_depth() == before + 1

    with_store(server, test)

def test_jobs_claimed_or_cancelled_by_pods_older_than_the_count_are_no_longer_counted(
    server: RedisServer,
) -> None:
    # A rolling upgrade: a still-draining worker claims with its old CLAIM, an old API replica
    # cancels with its old CANCEL; neither removes the job from the count, which kept a phantom
    # backlog (KEDA's scaling input) for the job TTL, a day by default.
    async def test(redis: Redis, store: JobStore) -> None:
        before = await store.queue_depth()
        for job_id in ("drift-waits", "drift-claimed-old", "drift-cancelled-old"):
            await store.create(JobRecord.new(job_id, JobRequest(prompt="a")), "{}")
        assert await store.queue_depth() == before + 3
        # What the old scripts leave in the records (and nothing else).
        await redis.hset(keys.job("drift-claimed-old"), mapping={"status": "running",
                                                                 "attempts": "1"})  # fmt: skip
        await redis.hset(keys.job("drift-cancelled-old"), "status", "cancelled")
        assert await store.queue_depth() == before + 1  # before: before + 3, for a day
        assert await redis.zscore(keys.QUEUED, "drift-waits") is not None

    with_store(server, test)


def test_jobs_queued_by_an_api_older_than_the_count_are_added_from_the_celery_list(
    server: RedisServer,
) -> None:
    # Jobs queued before the upgrade (the old CREATE wrote the record and pushed the message,
    # no more) were never counted: a real backlog read 0, and KEDA scaled the workers in.
    async def test(redis: Redis, store: JobStore) -> None:
        await redis.delete(keys.QUEUE)
        celery = make_celery(Settings(redis_url=server.url))
        before = await store.queue_depth()
        for job_id, status in (("old-queued-0", "queued"), ("old-queued-1", "queued"),
                               ("old-cancelled", "cancelled"), ("old-running", "running")):
            record = JobRecord.new(job_id, JobRequest(prompt="a"))
            await redis.hset(keys.job(job_id), mapping={**record.to_hash(), "status": status})
            await redis.lpush(keys.QUEUE, task_message(celery, job_id))
        await redis.lpush(keys.QUEUE, "not a Celery message", "{}", "[1]")
        await store.create(JobRecord.new("new-queued", JobRequest(prompt="a")),
                           task_message(celery, "new-queued"))  # counted already
        assert await store.queue_depth() == before + 1

        assert await store.add_missing_queued() == 2
        assert await store.queue_depth() == before + 3
        assert await store.add_missing_queued() == 0  # a second API's start adds nothing
        created = float(await redis.hget(keys.job("old-queued-0"), "created_at"))
        assert await redis.zscore(keys.QUEUED, "old-queued-0") == created
        await redis.delete(keys.QUEUE)

    with_store(server, test)


# -- lost replies ---------------------------------------------------------------------------

# The create's request carries the queue's name as one argument (RESP ends it with CRLF).
CREATE_MARKER = keys.QUEUE.encode() + b"\r\n"


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[ReplyLosingProxy]:
    direct = server.client()
    direct.delete(keys.QUEUE)
    lossy = ReplyLosingProxy(server.port)
    yield lossy
    lossy.close()
    assert not lossy.errors


def through(proxy: ReplyLosingProxy, test: Any) -> None:
    """Run test(store, submit) with the API's Redis client connected through the proxy."""

    async def run() -> None:
        settings = Settings(redis_url=proxy.url, job_ttl_s=JOB_TTL_S)
        redis = make_redis(settings)
        store = JobStore(redis, settings)
        celery, limits = make_celery(settings), ModelLimitsCache()

        async def submit(request: JobRequest, key: str) -> tuple[JobRecord, bool]:
            return await submit_job(
                request, store=store, celery=celery, limits=limits, settings=settings,
                idempotency_key=key, principal="p",
            )

        try:
            await test(store, submit)
        finally:
            await redis.aclose()

    asyncio.run(run())


def test_create_retried_after_lost_reply_keeps_claimed_record(
    server: RedisServer, proxy: ReplyLosingProxy
) -> None:
    # Redis runs the create, its reply is lost, and an idle worker (waiting in BRPOP) takes the
    # message and claims the job before redis-py sends the create again. The retry used to
    # write `queued` over the running job and push a second message: the job ran twice.
    direct = server.client()
    claim = direct.register_script(lua_scripts.CLAIM)
    job_id = "lost-create-reply"

    def worker_claims() -> None:
        assert direct.rpop(keys.QUEUE) is not None
        reply = claim(**lua_scripts.claim_call(job_id, "w1", now=time.time(), lease_ttl_s=30,
                                               ttl_s=JOB_TTL_S))  # fmt: skip
        assert reply[0] == "claimed"

    proxy.lose(CREATE_MARKER, then=worker_claims)

    async def test(store: JobStore, submit: Any) -> None:
        await store.create(JobRecord.new(job_id, JobRequest(prompt="a")), '{"message": 1}')

    through(proxy, test)
    assert proxy.cuts == 1
    record = direct.hgetall(keys.job(job_id))
    assert (record["status"], record["attempts"], record["worker"]) == ("running", "1", "w1")
    assert direct.get(keys.lease(job_id)) == "w1"
    assert direct.llen(keys.QUEUE) == 0  # no second message for it
    assert 0 < direct.ttl(keys.job(job_id)) <= JOB_TTL_S


def test_idempotency_key_kept_when_create_reply_lost(
    server: RedisServer, proxy: ReplyLosingProxy
) -> None:
    # Every attempt's reply is lost (the client tries 3 times): the request fails, but the job
    # exists and is queued, so the client's retry with the same key must get that job.
    direct = server.client()
    idem = keys.idempotency("p:lost-create")
    proxy.lose(CREATE_MARKER, times=3)

    async def test(store: JobStore, submit: Any) -> None:
        request = JobRequest(prompt="a", seed=1)
        with pytest.raises(sync_redis.ConnectionError):
            await submit(request, "lost-create")
        assert proxy.cuts == 3
        bound = direct.get(idem)
        assert bound is not None, "the key of a job that exists was released"
        first = json.loads(bound)["job_id"]
        assert direct.hget(keys.job(first), "status") == "queued"
        again, created = await submit(request, "lost-create")
        assert (again.id, created) == (first, False)

    through(proxy, test)
    assert direct.llen(keys.QUEUE) == 1  # one job, one message
    assert direct.ttl(idem) > PENDING_IDEMPOTENCY_S


def test_idempotency_key_released_when_create_failed_before_redis_ran_it(
    server: RedisServer,
) -> None:
    # The other side of the release: no record, so the key is freed at once for a retry.
    async def test(redis: Redis, store: JobStore) -> None:
        assert await store.claim_idempotency("p:never", "digest", "job-never") is None
        assert await store.release_idempotency("p:never", "job-other") is False  # not its key
        assert await store.release_idempotency("p:never", "job-never") is True
        assert not await redis.exists(keys.idempotency("p:never"))

    with_store(server, test)


def test_idempotency_set_reply_lost_is_not_409(
    server: RedisServer, proxy: ReplyLosingProxy
) -> None:
    # The key's SET NX ran but its reply was lost: redis-py's second SET NX finds the key bound,
    # to this very request. That used to answer "409 in progress" to it (and every retry, 30 s).
    direct = server.client()
    idem = keys.idempotency("p:lost-set")
    proxy.lose(idem.encode())

    async def test(store: JobStore, submit: Any) -> None:
        try:
            record, created = await submit(JobRequest(prompt="a"), "lost-set")
        except HTTPException as exc:
            pytest.fail(f"{exc.status_code}: {exc.detail}")
        assert created and json.loads(direct.get(idem))["job_id"] == record.id

    through(proxy, test)
    assert proxy.cuts == 1
    assert direct.llen(keys.QUEUE) == 1
