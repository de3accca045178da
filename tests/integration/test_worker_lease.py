"""The worker's JobStreamer keeps the lease of each job it runs, and stops a job it has lost.

RENEW itself is tested in test_job_scripts.py; this is about the streamer calling it in time
and acting on its answer. Real Redis; the engine request is a stand-in that records its cancel.
Each test drives one flush, with the job's last renewal set in the past, so no test waits a TTL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common import keys, lua_scripts
from services.common.jobs import JobRecord, JobRequest
from services.worker.job_supervisor import ActiveJob, JobStreamer
from services.worker.token_sink import TokenSink
from tests.helpers.redis_server import redis_server

pytestmark = pytest.mark.integration

LEASE_S = 6.0


class Handle:
    """What the streamer sees of the engine request: whether it was told to stop."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    with redis_server(Path(tmp_path_factory.mktemp("lease"))) as server:
        yield server.client()


def claimed_by(client: redis.Redis, job_id: str, owner: str) -> None:
    """A queued job that `owner` claims, as a worker does when it starts it."""
    client.delete(*lua_scripts.job_keys(job_id))
    client.hset(keys.job(job_id), mapping=JobRecord.new(job_id, JobRequest(prompt="a")).to_hash())
    claim = client.register_script(lua_scripts.CLAIM)
    call = lua_scripts.claim_call(job_id, owner, now=time.time(), lease_ttl_s=LEASE_S, ttl_s=3600)
    assert claim(**call)[0] == "claimed"


def streamer_for(client: redis.Redis) -> JobStreamer:
    renew = client.register_script(lua_scripts.RENEW)
    return JobStreamer(client, renew, lease_ttl_s=LEASE_S, ttl_s=3600)


def running(job_id: str, handle: Handle, sink: TokenSink, renewed_ago_s: float) -> ActiveJob:
    return ActiveJob(job_id, "w1", handle, sink, deadline=time.monotonic() + 3600,
                     last_renew=time.monotonic() - renewed_ago_s)  # fmt: skip


def test_a_job_running_past_its_lease_keeps_it_so_a_duplicate_delivery_is_refused(
    client: redis.Redis,
) -> None:
    # Without renewal the lease ran out under any job longer than LLM_LEASE_TTL_S: a second
    # delivery of its message then claimed it and ran it again from the start.
    claimed_by(client, "long-job", "w1")
    client.pexpire(keys.lease("long-job"), int(LEASE_S * 1000 / 2))  # half of it has passed
    streamer = streamer_for(client)
    streamer.add(running("long-job", Handle(), TokenSink(), renewed_ago_s=LEASE_S / 2))

    streamer.flush()

    assert client.get(keys.lease("long-job")) == "w1"
    assert client.pttl(keys.lease("long-job")) > LEASE_S * 1000 * 0.9  # a whole TTL again
    claim = client.register_script(lua_scripts.CLAIM)
    again = lua_scripts.claim_call("long-job", "w2", now=time.time(), lease_ttl_s=LEASE_S,
                                   ttl_s=3600)  # fmt: skip
    assert claim(**again) == ["leased", "w1"]


@pytest.mark.parametrize("found_by", ["streaming a chunk", "renewing the lease"])
def test_a_worker_whose_job_was_taken_over_stops_generating_it(
    client: redis.Redis, found_by: str
) -> None:
    # w1's lease ran out in a partition and w2 took the job over: whatever w1 makes can never
    # be recorded, so its engine slot must be freed, not kept generating to the end.
    job_id = f"taken-over-{found_by.split()[0]}"
    claimed_by(client, job_id, "w1")
    client.set(keys.lease(job_id), "w2", px=int(LEASE_S * 1000))
    handle, sink = Handle(), TokenSink()
    if found_by == "streaming a chunk":
        job = running(job_id, handle, sink, renewed_ago_s=0)
        sink.on_token(5, "Hello")  # w1's engine is still generating
    else:  # no new text, but its renewal is due
        job = running(job_id, handle, sink, renewed_ago_s=LEASE_S)
    streamer = streamer_for(client)
    streamer.add(job)

    streamer.flush()

    assert job.outcome == "lost"
    assert handle.cancelled
    assert client.xlen(keys.events(job_id)) == 0  # nothing of w1's reached the stream
    assert client.get(keys.lease(job_id)) == "w2"
