"""The Lua scripts behind the job's state changes (services/common/scripts.py), run by a real
Redis: what each transition does when the lease or the record is not what the caller expects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common import keys, scripts
from tests.helpers.redis_server import redis_server

pytestmark = pytest.mark.integration

LEASE_MS = 5_000


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    with redis_server(Path(tmp_path_factory.mktemp("scripts"))) as server:
        yield server.client()


def running_job(client: redis.Redis, job_id: str, status: str = "running") -> list[str]:
    """A job record in `status`; returns the keys RENEW and STREAM take."""
    from services.common.jobs import JobRecord, JobRequest

    record = JobRecord.new(job_id, JobRequest(prompt="a"))
    client.delete(*scripts.job_keys(job_id))
    client.hset(keys.job(job_id), mapping={**record.to_hash(), "status": status})
    return scripts.job_keys(job_id)


def test_a_lease_that_expired_unclaimed_is_taken_back_not_given_up(client: redis.Redis) -> None:
    # Redis away longer than the lease TTL: the key is gone when the worker renews, and nobody
    # else holds the job. Answering "lost" there left the job running forever with no worker.
    renew = client.register_script(scripts.RENEW)
    job_keys = running_job(client, "expired-job")
    assert renew(keys=job_keys, args=["w1", LEASE_MS]) == 1
    assert client.get(keys.lease("expired-job")) == "w1"
    assert 0 < client.pttl(keys.lease("expired-job")) <= LEASE_MS


def test_a_lease_held_by_another_worker_is_lost(client: redis.Redis) -> None:
    renew = client.register_script(scripts.RENEW)
    job_keys = running_job(client, "claimed-job")
    client.set(keys.lease("claimed-job"), "w2", px=LEASE_MS)
    assert renew(keys=job_keys, args=["w1", LEASE_MS]) == 0
    assert client.get(keys.lease("claimed-job")) == "w2"  # untouched


def test_the_lease_of_a_job_finished_elsewhere_is_not_taken_back(client: redis.Redis) -> None:
    # Another worker ran the redelivered job to the end (and dropped the lease): the first one,
    # back from a partition, must learn it lost the job rather than carry on writing to it.
    renew = client.register_script(scripts.RENEW)
    job_keys = running_job(client, "finished-elsewhere", status="succeeded")
    assert renew(keys=job_keys, args=["w1", LEASE_MS]) == 0
    assert client.get(keys.lease("finished-elsewhere")) is None


def test_renewing_ones_own_lease_extends_it(client: redis.Redis) -> None:
    renew = client.register_script(scripts.RENEW)
    job_keys = running_job(client, "own-job")
    client.set(keys.lease("own-job"), "w1", px=100)
    assert renew(keys=job_keys, args=["w1", LEASE_MS]) == 1
    assert client.pttl(keys.lease("own-job")) > 100


def test_chunks_are_written_only_while_the_job_is_ours(client: redis.Redis) -> None:
    from services.worker.streaming import Chunk

    stream = client.register_script(scripts.STREAM)
    chunks = [Chunk("token", "Hel", 1), Chunk("token", "lo", 1)]
    ours = running_job(client, "ours")
    client.set(keys.lease("ours"), "w1", px=LEASE_MS)
    assert stream(keys=ours, args=scripts.stream_args("w1", 60, chunks, 12.5)) == 1
    assert [f["text"] for _, f in client.xrange(keys.events("ours"))] == ["Hel", "lo"]
    assert client.hget(keys.job("ours"), "first_token_at") == "12.5"
    assert 0 < client.ttl(keys.events("ours")) <= 60

    taken = running_job(client, "taken")
    client.set(keys.lease("taken"), "w2", px=LEASE_MS)
    done = running_job(client, "done", status="succeeded")
    for job_keys in (taken, done):
        assert stream(keys=job_keys, args=scripts.stream_args("w1", 60, chunks, 12.5)) == 0
        assert client.xlen(job_keys[1]) == 0
        assert client.hget(job_keys[0], "first_token_at") is None


def test_live_workers_are_found_without_scanning_and_dead_ones_are_forgotten(
    client: redis.Redis,
) -> None:
    import asyncio
    import json

    from redis.asyncio import Redis as AsyncRedis

    from services.api.store import JobStore
    from services.common.settings import Settings
    from services.worker.healthcheck import fresh_workers

    client.set(keys.worker("alive"), json.dumps({"nodename": "alive", "host": "h1"}), ex=30)
    client.zadd(keys.WORKERS, {"alive": 1.0, "gone": 1.0})  # "gone": its key expired
    for i in range(2000):  # a day of job records beside them
        client.set(keys.job(f"old-{i}"), "x")
    client.config_resetstat()

    assert [w["nodename"] for w in fresh_workers(client)] == ["alive"]
    assert fresh_workers(client, host="elsewhere") == []
    assert client.zrange(keys.WORKERS, 0, -1) == ["alive"]  # the dead name left the set

    async def from_the_api() -> list[dict]:
        url = client.connection_pool.connection_kwargs
        aclient = AsyncRedis(host=url["host"], port=url["port"], decode_responses=True)
        try:
            return await JobStore(aclient, Settings()).workers()
        finally:
            await aclient.aclose()

    assert [w["nodename"] for w in asyncio.run(from_the_api())] == ["alive"]
    assert "cmdstat_scan" not in client.info("commandstats")


def test_claiming_a_job_restarts_its_records_ttl(client: redis.Redis) -> None:
    # A job that waited in the queue for most of LLM_JOB_TTL_S must not expire while it runs.
    from services.common.jobs import JobRecord, JobRequest

    claim = client.register_script(scripts.CLAIM)
    record = JobRecord.new("waited-long", JobRequest(prompt="a"))
    client.hset(keys.job(record.id), mapping=record.to_hash())
    client.expire(keys.job(record.id), 5)  # almost out
    reply = claim(**scripts.claim_call(record.id, "w1", now=0, lease_ttl_s=5, ttl_s=3600))
    assert reply[0] == "claimed"
    assert client.ttl(keys.job(record.id)) > 3000
