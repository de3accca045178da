"""The Lua scripts behind the job's state changes (services/common/lua_scripts.py), run by a real
Redis: what each transition does when the lease or the record is not what the caller expects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common import keys, lua_scripts
from tests.helpers.redis_server import redis_server

pytestmark = pytest.mark.integration

LEASE_MS = 5_000


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    with redis_server(Path(tmp_path_factory.mktemp("scripts"))) as server:
        yield server.client()


def job_in(client: redis.Redis, job_id: str, status: str = "running") -> list[str]:
    """A fresh job record in `status`; returns the keys RENEW and STREAM take."""
    from services.common.jobs import JobRecord, JobRequest

    record = JobRecord.new(job_id, JobRequest(prompt="a"))
    client.delete(*lua_scripts.job_keys(job_id))
    client.hset(keys.job(job_id), mapping={**record.to_hash(), "status": status})
    return lua_scripts.job_keys(job_id)


def final_job(client: redis.Redis, job_id: str, status: str) -> None:
    """A job that has ended with `status`: its record and its `done` event."""
    job_in(client, job_id, status=status)
    client.xadd(keys.events(job_id), {"type": "done", "status": status})


def test_a_lease_that_expired_unclaimed_is_taken_back_not_given_up(client: redis.Redis) -> None:
    # Redis away longer than the lease TTL: the key is gone when the worker renews, and nobody
    # else holds the job. Answering "lost" there left the job running forever with no worker.
    renew = client.register_script(lua_scripts.RENEW)
    job_keys = job_in(client, "expired-job")
    assert renew(keys=job_keys, args=["w1", LEASE_MS]) == 1
    assert client.get(keys.lease("expired-job")) == "w1"
    assert 0 < client.pttl(keys.lease("expired-job")) <= LEASE_MS


def test_a_lease_held_by_another_worker_is_lost(client: redis.Redis) -> None:
    renew = client.register_script(lua_scripts.RENEW)
    job_keys = job_in(client, "claimed-job")
    client.set(keys.lease("claimed-job"), "w2", px=LEASE_MS)
    assert renew(keys=job_keys, args=["w1", LEASE_MS]) == 0
    assert client.get(keys.lease("claimed-job")) == "w2"  # untouched


def test_the_lease_of_a_job_finished_elsewhere_is_not_taken_back(client: redis.Redis) -> None:
    # Another worker ran the redelivered job to the end (and dropped the lease): the first one,
    # back from a partition, must learn it lost the job rather than carry on writing to it.
    renew = client.register_script(lua_scripts.RENEW)
    job_keys = job_in(client, "finished-elsewhere", status="succeeded")
    assert renew(keys=job_keys, args=["w1", LEASE_MS]) == 0
    assert client.get(keys.lease("finished-elsewhere")) is None


def test_renewing_ones_own_lease_extends_it(client: redis.Redis) -> None:
    renew = client.register_script(lua_scripts.RENEW)
    job_keys = job_in(client, "own-job")
    client.set(keys.lease("own-job"), "w1", px=100)
    assert renew(keys=job_keys, args=["w1", LEASE_MS]) == 1
    assert client.pttl(keys.lease("own-job")) > 100


def test_chunks_are_written_only_while_the_job_is_ours(client: redis.Redis) -> None:
    from services.worker.token_sink import Chunk

    stream = client.register_script(lua_scripts.STREAM)
    chunks = [Chunk("token", "Hel", 1), Chunk("token", "lo", 1)]
    ours = job_in(client, "ours")
    client.set(keys.lease("ours"), "w1", px=LEASE_MS)
    assert stream(keys=ours, args=lua_scripts.stream_args("w1", 60, chunks, 12.5)) == 1
    assert [f["text"] for _, f in client.xrange(keys.events("ours"))] == ["Hel", "lo"]
    assert client.hget(keys.job("ours"), "first_token_at") == "12.5"
    assert 0 < client.ttl(keys.events("ours")) <= 60

    taken = job_in(client, "taken")
    client.set(keys.lease("taken"), "w2", px=LEASE_MS)
    done = job_in(client, "done", status="succeeded")
    for job_keys in (taken, done):
        assert stream(keys=job_keys, args=lua_scripts.stream_args("w1", 60, chunks, 12.5)) == 0
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

    claim = client.register_script(lua_scripts.CLAIM)
    record = JobRecord.new("waited-long", JobRequest(prompt="a"))
    client.hset(keys.job(record.id), mapping=record.to_hash())
    client.expire(keys.job(record.id), 5)  # almost out
    reply = claim(**lua_scripts.claim_call(record.id, "w1", now=0, lease_ttl_s=5, ttl_s=3600))
    assert reply[0] == "claimed"
    assert client.ttl(keys.job(record.id)) > 3000


def written(client: redis.Redis, job_id: str) -> dict:
    """Everything the job's scripts may write: its record, events and lease, their TTLs, the
    shared stats hash and the left-queue stream. Equal before and after: the call wrote nothing."""
    return {
        "record": client.hgetall(keys.job(job_id)),
        "record_ttl": client.ttl(keys.job(job_id)),
        "events": client.xrange(keys.events(job_id)),
        "events_ttl": client.ttl(keys.events(job_id)),
        "lease": client.get(keys.lease(job_id)),
        "stats": client.hgetall(keys.STATS),
        "left_queue": client.xrange(keys.LEFT_QUEUE),
    }


def finish_call(job_id: str, owner: str, status: str = "succeeded") -> dict[str, list]:
    """FINISH's keys and args as the worker builds them, for a job of 3 tokens."""
    from services.common.stats import finish_increments

    counters, sums = finish_increments(status, 3, 2.0, 0.5)
    fields = {"finished_at": "100.0", "text": "abc", "completion_tokens": "3"}
    return {
        "keys": [keys.job(job_id), keys.events(job_id), keys.lease(job_id), keys.STATS],
        "args": lua_scripts.finish_args(owner, status, 60, fields, counters, sums),
    }


def cancel_call(job_id: str, now: float = 50.0) -> dict[str, list]:
    """CANCEL's keys and args as the API's JobStore.cancel builds them."""
    return {
        "keys": [keys.job(job_id), keys.events(job_id), keys.STATS, keys.LEFT_QUEUE,
                 keys.QUEUED],
        "args": [repr(now), 60, job_id],
    }


def test_a_job_leased_to_a_live_worker_is_not_claimed_again(client: redis.Redis) -> None:
    # The task redelivered while its first worker still runs it (and renews the lease): the second
    # worker must leave the job alone, not run it a second time beside the first.
    claim = client.register_script(lua_scripts.CLAIM)
    job_in(client, "held")
    client.hset(keys.job("held"), mapping={"worker": "w2", "attempts": "1", "started_at": "1.0"})
    client.set(keys.lease("held"), "w2", px=LEASE_MS)
    before = written(client, "held")
    reply = claim(**lua_scripts.claim_call("held", "w1", now=9, lease_ttl_s=60, ttl_s=3600))
    assert reply == ["leased", "w2"]
    assert written(client, "held") == before  # status, worker, attempts, lease: all w2's
    assert 0 < client.pttl(keys.lease("held")) <= LEASE_MS  # not renewed for w1 either


def test_a_job_whose_lease_expired_is_taken_over(client: redis.Redis) -> None:
    # Its worker died: the next one claims the job as a new attempt, keeps its start time, and
    # does not announce again a job that left the queue long ago.
    claim = client.register_script(lua_scripts.CLAIM)
    job_in(client, "orphaned")
    first = {"worker": "w1", "attempts": "1", "started_at": "1.0"}
    client.hset(keys.job("orphaned"), mapping=first)
    announced = client.xrange(keys.LEFT_QUEUE)
    reply = claim(**lua_scripts.claim_call("orphaned", "w2", now=9, lease_ttl_s=5, ttl_s=3600))
    assert reply == ["claimed", "2", ""]
    job = client.hgetall(keys.job("orphaned"))
    assert (job["status"], job["worker"], job["started_at"]) == ("running", "w2", "1.0")
    assert client.get(keys.lease("orphaned")) == "w2"
    assert client.xrange(keys.LEFT_QUEUE) == announced


def test_a_duplicate_delivery_is_run_by_the_first_claimant_only(client: redis.Redis) -> None:
    # Two workers get the same queued job (a redelivery while the first is alive): one claim wins,
    # the other is told who holds it, and only the winner's result is recorded.
    claim = client.register_script(lua_scripts.CLAIM)
    finish = client.register_script(lua_scripts.FINISH)
    job_id = "twice-delivered"
    job_in(client, job_id, status="queued")
    announced = client.xlen(keys.LEFT_QUEUE)

    first = claim(**lua_scripts.claim_call(job_id, "w1", now=1, lease_ttl_s=5, ttl_s=3600))
    second = claim(**lua_scripts.claim_call(job_id, "w2", now=2, lease_ttl_s=5, ttl_s=3600))
    assert first == ["claimed", "1", ""]
    assert second == ["leased", "w1"]
    job = client.hgetall(keys.job(job_id))
    assert {k: job[k] for k in ("status", "worker", "attempts", "started_at")} == {
        "status": "running", "worker": "w1", "attempts": "1", "started_at": "1"}  # fmt: skip
    assert client.get(keys.lease(job_id)) == "w1"
    assert client.xlen(keys.LEFT_QUEUE) == announced + 1  # it left the queue once

    stats = client.hgetall(keys.STATS)
    assert finish(**finish_call(job_id, "w2", status="failed")) == 0  # the loser's result
    assert client.hget(keys.job(job_id), "status") == "running"
    assert client.xlen(keys.events(job_id)) == 0
    assert client.hgetall(keys.STATS) == stats
    assert finish(**finish_call(job_id, "w1")) == 1  # the winner's
    assert client.hget(keys.job(job_id), "status") == "succeeded"
    done = [f for _, f in client.xrange(keys.events(job_id))]
    assert done == [{"type": "done", "status": "succeeded"}]


def test_a_worker_that_lost_the_lease_records_no_result(client: redis.Redis) -> None:
    # w1 stalled past its lease and w2 took the job over: w1's late result must not overwrite
    # the job, end its stream or count in the stats while w2 still runs it.
    finish = client.register_script(lua_scripts.FINISH)
    job_in(client, "taken-over")
    client.hset(keys.job("taken-over"), "worker", "w2")
    client.set(keys.lease("taken-over"), "w2", px=LEASE_MS)
    client.xadd(keys.events("taken-over"), {"type": "token", "text": "Hi", "tokens": "1"})
    before = written(client, "taken-over")
    assert finish(**finish_call("taken-over", "w1")) == 0
    after = written(client, "taken-over")
    assert after["record"]["status"] == "running"
    assert after["events"] == before["events"]  # no `done`
    assert after["stats"] == before["stats"]
    assert after == before
    assert finish(**finish_call("taken-over", "w2")) == 1  # the holder still can


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_a_job_already_final_is_not_finished_again(client: redis.Redis, status: str) -> None:
    # A redelivered task, or a late worker, finishing a job that has its result (and no lease
    # any more): the first result stands and is counted once.
    finish = client.register_script(lua_scripts.FINISH)
    job_id = f"final-{status}"
    final_job(client, job_id, status)
    before = written(client, job_id)
    for owner in ("w1", ""):
        assert finish(**finish_call(job_id, owner, status="failed")) == 0
        assert finish(**finish_call(job_id, owner, status="succeeded")) == 0
    after = written(client, job_id)
    assert after["record"]["status"] == status
    assert len(after["events"]) == 1
    assert after["stats"] == before["stats"]
    assert after == before


def test_finishing_twice_counts_the_job_once(client: redis.Redis) -> None:
    # The same worker's FINISH retried after a lost reply, or its task redelivered (a new owner)
    # after the job ended: the second call finds the job final and writes nothing. Only the
    # owner that recorded the result is told it did (1), so it does not report its job lost.
    finish = client.register_script(lua_scripts.FINISH)
    job_in(client, "retried")
    client.set(keys.lease("retried"), "w1", px=LEASE_MS)
    stats = client.hgetall(keys.STATS)
    assert finish(**finish_call("retried", "w1")) == 1
    assert client.get(keys.lease("retried")) is None
    once = written(client, "retried")
    assert int(once["stats"].get("jobs:succeeded", 0)) == int(stats.get("jobs:succeeded", 0)) + 1
    assert finish(**finish_call("retried", "w1", status="failed")) == 1
    assert finish(**finish_call("retried", "w2", status="failed")) == 0
    assert finish(**finish_call("retried", "", status="failed")) == 0
    assert written(client, "retried") == once
    assert [f["type"] for _, f in client.xrange(keys.events("retried"))] == ["done"]


def test_a_job_finished_before_any_chunk_gets_an_events_stream_that_expires(
    client: redis.Redis,
) -> None:
    # A job failed or cancelled at once, or whose first token was eos, has no stream until
    # FINISH's `done` makes one: without a TTL that stream outlived its record for ever.
    claim = client.register_script(lua_scripts.CLAIM)
    finish = client.register_script(lua_scripts.FINISH)
    job_in(client, "no-chunks", status="queued")
    assert claim(**lua_scripts.claim_call("no-chunks", "w1", now=1, lease_ttl_s=5,
                                          ttl_s=3600))[0] == "claimed"  # fmt: skip
    assert not client.exists(keys.events("no-chunks"))

    assert finish(**finish_call("no-chunks", "w1", status="failed")) == 1
    assert [f["type"] for _, f in client.xrange(keys.events("no-chunks"))] == ["done"]
    assert 0 < client.ttl(keys.events("no-chunks")) <= 60  # finish_call's ttl_s


def test_cancelling_a_queued_job_ends_it_at_once(client: redis.Redis) -> None:
    cancel = client.register_script(lua_scripts.CANCEL)
    claim = client.register_script(lua_scripts.CLAIM)
    job_id = "cancel-queued"
    job_in(client, job_id, status="queued")
    before = written(client, job_id)

    assert cancel(**cancel_call(job_id, now=50.0)) == "cancelled"
    after = written(client, job_id)
    job = after["record"]
    ended = {"status": "cancelled", "finished_at": "50.0", "finish_reason": "cancelled"}
    assert {k: job[k] for k in ended} == ended
    assert (job["text"], job["completion_tokens"]) == ("", "0")
    assert [f for _, f in after["events"]] == [{"type": "done", "status": "cancelled"}]
    assert 0 < after["events_ttl"] <= 60
    cancelled = int(before["stats"].get("jobs:cancelled", 0)) + 1
    assert after["stats"] == {**before["stats"], "jobs:cancelled": str(cancelled)}
    assert after["left_queue"][:-1] == before["left_queue"]  # announced once, as it leaves
    assert after["left_queue"][-1][1] == {"job": job_id}
    assert after["lease"] is None

    # The worker that gets the task later finds the job final and leaves it be.
    reply = claim(**lua_scripts.claim_call(job_id, "w1", now=60, lease_ttl_s=5, ttl_s=3600))
    assert reply == ["cancelled"]
    assert written(client, job_id) == after


def test_cancelling_a_running_job_asks_its_worker_to_stop(client: redis.Redis) -> None:
    # Only the worker can end a job it runs (it stops between decode steps and finishes it as
    # cancelled): the API only raises the flag.
    cancel = client.register_script(lua_scripts.CANCEL)
    job_in(client, "cancel-running")
    client.set(keys.lease("cancel-running"), "w1", px=LEASE_MS)
    before = written(client, "cancel-running")
    assert "cancel_requested" not in before["record"]
    assert cancel(**cancel_call("cancel-running")) == "running"
    after = written(client, "cancel-running")
    assert after["record"] == {**before["record"], "cancel_requested": "1"}
    assert {**after, "record": None} == {**before, "record": None}  # no `done`, no stats, lease
    assert cancel(**cancel_call("cancel-running")) == "running"  # asking again is harmless
    assert written(client, "cancel-running") == after


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_cancelling_a_finished_job_changes_nothing(client: redis.Redis, status: str) -> None:
    cancel = client.register_script(lua_scripts.CANCEL)
    job_id = f"cancel-{status}"
    final_job(client, job_id, status)
    before = written(client, job_id)
    assert cancel(**cancel_call(job_id)) == status
    assert written(client, job_id) == before


def test_cancelling_an_unknown_job_creates_nothing(client: redis.Redis) -> None:
    cancel = client.register_script(lua_scripts.CANCEL)
    client.delete(*lua_scripts.job_keys("never-was"))
    before = written(client, "never-was")
    assert cancel(**cancel_call("never-was")) == "missing"
    assert written(client, "never-was") == before
    assert client.exists(keys.job("never-was"), keys.events("never-was")) == 0
