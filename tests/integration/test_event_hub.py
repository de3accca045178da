"""services.api.events.EventHub against a real Redis: one reader for every open event stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.api.app import make_redis, make_stream_reader
from services.api.events import EventHub, entry_order
from services.api.store import JobStore
from services.common import keys, lua_scripts
from services.common.jobs import JobRecord, JobRequest
from services.common.settings import Settings
from tests.helpers.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with redis_server(tmp_path_factory.mktemp("redis"), appendonly=False) as srv:
        yield srv


@pytest.fixture
def own_server(tmp_path: Path) -> Any:
    """A Redis for one test that stops, restarts or reconfigures it."""
    with redis_server(tmp_path / "redis", appendonly=False) as srv:
        yield srv


@contextlib.asynccontextmanager
async def hub_on(
    server: RedisServer, block_ms: int = 2000, check_parked_s: float = 2.0
) -> AsyncIterator[EventHub]:
    settings = Settings(redis_url=server.url)
    redis = make_redis(settings)
    hub = EventHub(
        redis, make_stream_reader(settings), block_ms=block_ms, check_parked_s=check_parked_s
    )
    try:
        yield hub
    finally:
        await hub.close()
        await redis.aclose()


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


async def add(redis: Redis, job_id: str, text: str) -> str:
    return await redis.xadd(keys.events(job_id), {"type": "token", "text": text})


async def collect(sub: Any, n: int, timeout_s: float = 10.0) -> list[str]:
    """Texts of the next n entries, or fail after timeout_s."""
    texts: list[str] = []
    async with asyncio.timeout(timeout_s):
        while len(texts) < n:
            texts += [fields["text"] for _, fields in await sub.next(timeout_s)]
    return texts


async def reader_blocked(admin: Redis, timeout_s: float = 5.0) -> None:
    """Wait until Redis has a client blocked (the hub's reader in its XREAD BLOCK). INFO needs
    no CLIENT command, so admin may be a client that the ACL denies CLIENT to."""
    async with asyncio.timeout(timeout_s):
        while (await admin.info("clients"))["blocked_clients"] < 1:
            await asyncio.sleep(0.01)


async def a_late_stream_gets_its_backlog_and_live_events_at_once(
    hub: EventHub, writer: Redis
) -> None:
    """With the reader blocked (30 s) on an idle stream, a new one is served within 5 s."""
    await add(writer, "late", "backlog")
    async with hub.subscribe("idle"):
        await reader_blocked(writer)  # the reader is now blocked on the idle stream
        async with hub.subscribe("late") as late:
            assert await collect(late, 1, timeout_s=5) == ["backlog"]
            await add(writer, "late", "live")
            assert await collect(late, 1, timeout_s=5) == ["live"]


def test_many_streams_are_read_over_one_connection_each_getting_only_its_entries(
    server: RedisServer,
) -> None:
    async def test() -> None:
        writer = Redis.from_url(server.url, decode_responses=True)
        before = len(await writer.client_list())
        async with hub_on(server) as hub, contextlib.AsyncExitStack() as stack:
            jobs = [f"many-{i}" for i in range(24)]
            subs = [await stack.enter_async_context(hub.subscribe(j)) for j in jobs]
            for round_ in range(3):
                for j in jobs:
                    await add(writer, j, f"{j}:{round_}")
            got = await asyncio.gather(*(collect(s, 3) for s in subs))
            assert got == [[f"{j}:{r}" for r in range(3)] for j in jobs]
            # The hub's reader plus the pool's CLIENT UNBLOCK connection(s); not one per stream.
            assert len(await writer.client_list()) - before <= 3
        await writer.aclose()

    run(test)


def test_a_new_stream_gets_its_events_at_once_while_others_block(server: RedisServer) -> None:
    async def test() -> None:
        writer = Redis.from_url(server.url, decode_responses=True)
        async with hub_on(server, block_ms=30_000) as hub:
            await a_late_stream_gets_its_backlog_and_live_events_at_once(hub, writer)
        await writer.aclose()

    run(test)


def test_without_client_commands_new_streams_still_get_their_events_promptly(
    own_server: RedisServer,
) -> None:
    srv = own_server  # stopped, restarted or reconfigured by this test only

    async def test() -> None:
        writer = Redis.from_url(srv.url, decode_responses=True)
        await writer.acl_setuser("default", enabled=True, nopass=True, commands=["-client"])
        with pytest.raises(RedisError):
            await writer.client_id()  # as on a managed Redis that disables CLIENT
        async with hub_on(srv, block_ms=30_000) as hub:
            await a_late_stream_gets_its_backlog_and_live_events_at_once(hub, writer)
        await writer.aclose()

    run(test)


def test_subscriptions_resume_after_their_own_cursor(server: RedisServer) -> None:
    async def test() -> None:
        writer = Redis.from_url(server.url, decode_responses=True)
        ids = [await add(writer, "resume", t) for t in ("a", "b", "c")]
        async with hub_on(server) as hub:
            async with hub.subscribe("resume") as whole, hub.subscribe("resume", ids[1]) as tail:
                assert await collect(whole, 3) == ["a", "b", "c"]
                assert await collect(tail, 1) == ["c"]
                await add(writer, "resume", "d")
                assert await collect(whole, 1) == ["d"] and await collect(tail, 1) == ["d"]
        await writer.aclose()

    run(test)


def test_a_subscription_behind_a_pending_read_misses_nothing_when_the_wake_comes_late(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A client resuming from an old id joins a stream the reader is already blocked on from a
    # later cursor. If that read returns before the wake lands (a busy stream; or a Redis that
    # refuses CLIENT UNBLOCK), its entries must not move the new client's cursor past the ones
    # it has not been sent yet.
    async def test() -> None:
        writer = Redis.from_url(server.url, decode_responses=True)
        ids = [await add(writer, "behind", t) for t in ("a", "b", "c")]
        async with hub_on(server, block_ms=5000) as hub:
            async with hub.subscribe("behind", ids[-1]) as live:
                await reader_blocked(writer)  # the reader blocks from "c" on

                async def late_wake(sub: Any) -> None:
                    return None

                monkeypatch.setattr(hub, "_wake", late_wake)
                async with hub.subscribe("behind", "0-0") as resumed:
                    await add(writer, "behind", "d")  # answers the read pending from "c"
                    assert await collect(live, 1) == ["d"]
                    assert await collect(resumed, 4) == ["a", "b", "c", "d"]
        await writer.aclose()

    run(test)


def test_the_reader_stops_when_the_last_subscription_closes(server: RedisServer) -> None:
    async def test() -> None:
        async with hub_on(server, block_ms=100) as hub:
            async with hub.subscribe("gone"):
                assert hub.open_subscriptions == 1
            assert hub.open_subscriptions == 0
            async with asyncio.timeout(5):
                while hub._task is not None and not hub._task.done():
                    await asyncio.sleep(0.02)

    run(test)


def test_a_redis_outage_ends_subscriptions_and_the_hub_serves_again_after(
    own_server: RedisServer,
) -> None:
    srv = own_server  # stopped, restarted or reconfigured by this test only

    async def test() -> None:
        async with hub_on(srv) as hub:
            async with hub.subscribe("outage") as sub:
                admin = Redis.from_url(srv.url)
                await reader_blocked(admin)  # the reader is blocked in its XREAD
                await admin.aclose()
                await asyncio.to_thread(srv.stop)
                with pytest.raises(RedisError):
                    await sub.next(10)
            await asyncio.to_thread(srv.start)
            writer = Redis.from_url(srv.url, decode_responses=True)
            await add(writer, "after", "back")
            async with hub.subscribe("after") as sub:
                assert await collect(sub, 1) == ["back"]
            await writer.aclose()

    run(test)


def test_entry_ids_order_by_time_then_sequence() -> None:
    ids = ["0-0", "5-1", "12-0", "12-3", "100-0"]
    assert sorted(reversed(ids), key=entry_order) == ids


def test_an_unexpected_reader_error_ends_the_streams_instead_of_starving_them(
    server: RedisServer,
) -> None:
    async def test() -> None:
        writer = Redis.from_url(server.url, decode_responses=True)
        async with hub_on(server) as hub:
            real_xread = hub._reader.xread
            calls = 0

            async def broken_once(*args: Any, **kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise ValueError("a reply the client could not parse")
                return await real_xread(*args, **kwargs)

            hub._reader.xread = broken_once  # type: ignore[method-assign]
            async with hub.subscribe("odd") as sub:
                with pytest.raises(RedisError, match="could not parse"):
                    await sub.next(10)
            await add(writer, "odd", "fine")
            async with hub.subscribe("odd") as sub:
                assert await collect(sub, 1) == ["fine"]
        await writer.aclose()

    run(test)


def test_waiting_for_done_sees_it_written_before_or_during_the_wait(server: RedisServer) -> None:
    async def test() -> None:
        writer = Redis.from_url(server.url, decode_responses=True)
        async with hub_on(server) as hub:
            await writer.xadd(keys.events("early"), {"type": "done", "status": "succeeded"})
            assert await hub.wait_done("early", 5) is True
            assert await hub.wait_done("never", 0.3) is False

            async def finish_later() -> None:
                await asyncio.sleep(0.3)
                await add(writer, "later", "token")
                await writer.xadd(keys.events("later"), {"type": "done", "status": "succeeded"})

            finisher = asyncio.create_task(finish_later())
            assert await hub.wait_done("later", 10) is True
            await finisher
        await writer.aclose()

    run(test)


# -- streams of queued jobs are parked ------------------------------------------------------------


async def queue_job(redis: Redis, job_id: str) -> None:
    record = JobRecord.new(job_id, JobRequest(prompt="Once"))
    await redis.hset(keys.job(job_id), mapping=record.to_hash())


async def claim(redis: Redis, job_id: str) -> None:
    """What a worker does on taking the job: the real CLAIM script, which announces it."""
    script = redis.register_script(lua_scripts.CLAIM)
    reply = await script(**lua_scripts.claim_call(job_id, "test-worker", now=0, lease_ttl_s=60,
                                                  ttl_s=3600))  # fmt: skip
    assert reply[0] == "claimed"


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def hub_with_queued_job(
    server: RedisServer, job_id: str, check_parked_s: float
) -> AsyncIterator[tuple[EventHub, Redis]]:
    """A hub whose reader blocks 30 s, and a writer; job_id's record is queued."""
    writer = Redis.from_url(server.url, decode_responses=True)
    try:
        async with hub_on(server, block_ms=30_000, check_parked_s=check_parked_s) as hub:
            await queue_job(writer, job_id)
            yield hub, writer
    finally:
        await writer.aclose()


def test_a_queued_jobs_stream_is_parked_until_a_worker_claims_the_job(server: RedisServer) -> None:
    async def test() -> None:
        # No check of parked jobs within the test: only the claim's announcement can unpark.
        async with hub_with_queued_job(server, "parked", check_parked_s=600) as (hub, writer):
            async with hub.subscribe("parked") as sub:
                assert hub.parked_streams == 1
                await reader_blocked(writer)  # the reader blocks on LEFT_QUEUE alone
                await claim(writer, "parked")
                await eventually(lambda: hub.parked_streams == 0)
                await add(writer, "parked", "first")
                assert await collect(sub, 1, timeout_s=5) == ["first"]

    run(test)


def test_cancelling_a_queued_job_ends_its_parked_stream_at_once(server: RedisServer) -> None:
    async def test() -> None:
        async with hub_with_queued_job(server, "dropped", check_parked_s=600) as (hub, writer):
            store = JobStore(writer, Settings(redis_url=server.url))
            waiting = asyncio.create_task(hub.wait_done("dropped", 10))
            await eventually(lambda: hub.parked_streams == 1)
            assert await store.cancel("dropped") == "cancelled"
            async with asyncio.timeout(5):
                assert await waiting is True

    run(test)


def test_a_job_that_left_the_queue_unannounced_is_found_by_the_hubs_check(
    server: RedisServer,
) -> None:
    async def test() -> None:
        async with hub_with_queued_job(server, "quiet", check_parked_s=0.3) as (hub, writer):
            async with hub.subscribe("quiet") as sub:
                assert hub.parked_streams == 1
                # A worker older than the announcement: status and tokens, no LEFT_QUEUE entry.
                await writer.hset(keys.job("quiet"), "status", "running")
                await add(writer, "quiet", "found")
                assert await collect(sub, 1, timeout_s=5) == ["found"]
                assert hub.parked_streams == 0

    run(test)


def test_claims_racing_new_subscriptions_lose_no_stream(server: RedisServer) -> None:
    """A worker claims each job from 0 to 3 ms after its client subscribes, so claims land before,
    during and after the subscription's status check: every stream still gets its token, the
    parked ones from the announcement alone (no check of parked jobs in the test)."""

    async def test() -> None:
        writer = Redis.from_url(server.url, decode_responses=True)
        async with hub_on(server, block_ms=30_000, check_parked_s=600) as hub:
            most_parked = 0

            async def one(i: int) -> list[str]:
                nonlocal most_parked
                job = f"race-{i}"
                await queue_job(writer, job)

                async def client() -> list[str]:
                    async with hub.subscribe(job) as sub:
                        return await collect(sub, 1, timeout_s=5)

                listening = asyncio.create_task(client())
                await asyncio.sleep(0.0005 * (i % 7))
                most_parked = max(most_parked, hub.parked_streams)
                await claim(writer, job)
                await add(writer, job, job)
                return await listening

            got = await asyncio.gather(*(one(i) for i in range(60)))
            assert got == [[f"race-{i}"] for i in range(60)]
            assert most_parked > 0  # the parking path was taken, not only the running one
        await writer.aclose()

    run(test)


def test_reads_leave_out_parked_streams(server: RedisServer) -> None:
    """With 200 clients on queued jobs and one on a running job, each XREAD that Redis runs names
    the running job's stream and LEFT_QUEUE only."""

    async def test() -> None:
        writer = Redis.from_url(server.url, decode_responses=True)
        async with hub_on(server, block_ms=30_000, check_parked_s=600) as hub, \
                contextlib.AsyncExitStack() as stack:  # fmt: skip
            for i in range(200):
                await queue_job(writer, f"backlog-{i}")
                await stack.enter_async_context(hub.subscribe(f"backlog-{i}"))
            live = await stack.enter_async_context(hub.subscribe("live"))
            assert hub.parked_streams == 200
            await add(writer, "live", "warm")
            assert await collect(live, 1) == ["warm"]
            async with writer.monitor() as monitor:
                for n in range(3):
                    await add(writer, "live", f"t{n}")
                    assert await collect(live, 1) == [f"t{n}"]
                xreads = []
                async with asyncio.timeout(5):
                    while len(xreads) < 3:
                        command = (await monitor.next_command())["command"]
                        if command.upper().startswith("XREAD "):
                            xreads.append(command)
            for command in xreads:
                assert "backlog-" not in command
                assert keys.events("live") in command and keys.LEFT_QUEUE in command
        await writer.aclose()

    run(test)


def test_closing_the_hub_ends_its_reader_even_as_a_read_is_being_sent(server: RedisServer) -> None:
    """The reader sends its next XREAD right after handing over an entry; closing then must not
    wait out the reader's 10 s socket timeout (Python 3.11's wait_for can lose that cancel)."""

    async def test() -> None:
        writer = Redis.from_url(server.url, decode_responses=True)
        settings = Settings(redis_url=server.url)
        for i in range(5):
            redis = make_redis(settings)
            hub = EventHub(redis, make_stream_reader(settings), block_ms=30_000)
            async with hub.subscribe(f"closing-{i}") as sub:
                await add(writer, f"closing-{i}", "last")
                assert await collect(sub, 1) == ["last"]
            started = time.monotonic()
            await hub.close()
            assert time.monotonic() - started < 5
            await redis.aclose()
        await writer.aclose()

    run(test)


async def hget_calls(redis: Redis) -> int:
    return (await redis.info("commandstats")).get("cmdstat_hget", {}).get("calls", 0)


async def hget_and_script_calls(redis: Redis) -> tuple[int, int]:
    stats = await redis.info("commandstats")
    return tuple(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("hget", "evalsha"))


SLACK_S = 0.1


async def times_of_calls(
    count: Callable[[], Coroutine[Any, Any, int]], n: int, timeout_s: float = 20.0
) -> list[float]:
    """The monotonic times at which count() grew, one per call, until it has grown n times
    (two calls between two polls share a time). Fails after timeout_s."""
    start = await count()
    times: list[float] = []
    async with asyncio.timeout(timeout_s):
        while len(times) < n:
            await asyncio.sleep(0.005)
            now = await count()
            times += [time.monotonic()] * (now - start - len(times))
    return times


@contextlib.asynccontextmanager
async def sse_clients(
    server: RedisServer, job_ids: list[str], *, claimed: bool = False, check_parked_s: float = 2.0
) -> AsyncIterator[tuple[EventHub, Redis, list[asyncio.Task[Any]]]]:
    """The API's SSE generator (routers.jobs._stream) on each of job_ids, queued (or claimed)
    here, over one hub: yields the hub, a writer, and for each a task awaiting its first event,
    once every subscription has made its own status check."""
    from services.api.routers import jobs

    settings = Settings(redis_url=server.url)
    writer = Redis.from_url(server.url, decode_responses=True)
    redis = make_redis(settings)
    for job_id in job_ids:
        await queue_job(writer, job_id)
        if claimed:
            await claim(writer, job_id)
    try:
        async with hub_on(server, check_parked_s=check_parked_s) as hub:
            opened = await hget_calls(writer) + len(job_ids)
            streams = [jobs._stream(JobStore(redis, settings), hub, j, "0-0") for j in job_ids]
            readers = [asyncio.create_task(anext(stream)) for stream in streams]
            async with asyncio.timeout(5):
                while await hget_calls(writer) < opened:
                    await asyncio.sleep(0.01)
            try:
                yield hub, writer, readers
            finally:
                for reader in readers:
                    reader.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
                for stream in streams:
                    await stream.aclose()
    finally:
        await redis.aclose()
        await writer.aclose()


def test_an_idle_event_stream_checks_its_job_less_and_less_often(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API's SSE generator on a running job that is quiet: each quiet check doubles the wait
    (0.2 s doubling to 0.8 s here), so its status reads come 0.4, 0.8, 0.8 s apart rather than
    every 0.2 s."""
    from services.api.routers import jobs

    monkeypatch.setattr(jobs, "WAIT_S", 0.2)
    monkeypatch.setattr(jobs, "MAX_WAIT_S", 0.8)

    async def test() -> None:
        async with sse_clients(server, ["quiet-running"], claimed=True) as (_, writer, [reader]):
            # Only lower bounds: a slow machine stretches the gaps, never shortens them. SLACK:
            # how much later a poll may see one check than the next poll sees the next one.
            times = await times_of_calls(lambda: hget_calls(writer), 4)
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert all(gap >= want - SLACK_S for gap, want in zip(gaps, [0.4, 0.8, 0.8])), gaps
            assert times[-1] - times[0] >= 2.0 - SLACK_S, gaps  # not 0.6 s, as without doubling
            await store_done(writer, "quiet-running")
            assert (await reader).event == "done"  # still a live stream after its checks

    run(test)


class UndeliveredHub:
    """A hub whose deliveries have not come yet: every wait ends quiet. It stands in for the
    moment the job finishes as the SSE generator's quiet check runs, before the hub's next read
    hands the last entries over."""

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: str, after: str = "0-0") -> AsyncIterator[Any]:
        class Quiet:
            closing = False

            async def next(self, timeout_s: float, **_: Any) -> list:
                return []

        yield Quiet()


def test_a_stream_whose_job_finished_unseen_still_sends_the_rest_and_done(
    server: RedisServer,
) -> None:
    from services.api.routers import jobs

    async def test() -> None:
        redis = Redis.from_url(server.url, decode_responses=True)
        record = JobRecord.new("finished-unseen", JobRequest(prompt="a"))
        await redis.hset(keys.job(record.id), mapping={**record.to_hash(), "status": "succeeded"})
        ids = [await add(redis, record.id, t) for t in ("x", "y")]
        await redis.xadd(keys.events(record.id), {"type": "done", "status": "succeeded"})
        store = JobStore(redis, Settings(redis_url=server.url))
        try:
            events = [e async for e in jobs._stream(store, UndeliveredHub(), record.id, ids[0])]
        finally:
            await redis.aclose()
        assert [e.event for e in events] == ["token", "done"]  # after the client's "x"
        assert json.loads(events[0].data)["text"] == "y"

    run(test)


def test_streams_of_queued_jobs_leave_checking_their_jobs_to_the_hub(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 SSE generators on queued jobs, quiet checks due every 0.1 s: none reads its job's
    status; the hub checks all 50 jobs in one script call per check (every 0.3 s here), and
    finds the job that finished without an announcement, whose client gets its `done`."""
    from services.api.routers import jobs

    monkeypatch.setattr(jobs, "WAIT_S", 0.1)
    monkeypatch.setattr(jobs, "MAX_WAIT_S", 0.1)

    async def test() -> None:
        ids = [f"waiting-{i}" for i in range(50)]
        async with sse_clients(server, ids, check_parked_s=0.3) as (hub, writer, readers):
            await writer.script_load(lua_scripts.NOT_QUEUED)  # no NOSCRIPT round in the counts
            assert hub.parked_streams == 50
            hgets, scripts_run = await hget_and_script_calls(writer)

            async def script_calls() -> int:
                return (await hget_and_script_calls(writer))[1]

            # The hub's checks, at least 0.3 s apart: 0.9 s at least, in which each generator
            # would have made 9 quiet checks of its own if it did not leave them to the hub.
            times = await times_of_calls(script_calls, 4)
            hgets_after, scripts_after = await hget_and_script_calls(writer)
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert all(gap >= 0.3 - SLACK_S for gap in gaps), gaps
            assert times[-1] - times[0] >= 0.9 - SLACK_S, gaps
            checks = scripts_after - scripts_run
            assert checks >= 4
            # Redis counts a script's commands too: every HGET was the hub's, one per job.
            assert hgets_after - hgets == 50 * checks
            assert not any(reader.done() for reader in readers)

            await store_done(writer, ids[7])  # e.g. an older API's cancel: no announcement
            async with asyncio.timeout(5):
                assert (await readers[7]).event == "done"
            assert hub.parked_streams == 49

    run(test)


def test_the_stream_of_a_queued_job_whose_record_expired_ends(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued job's record expires (LLM_JOB_TTL_S) with a client streaming it: the hub's
    check unparks the stream, whose next quiet check finds no job and ends it."""
    from services.api.routers import jobs

    monkeypatch.setattr(jobs, "WAIT_S", 0.2)

    async def test() -> None:
        async with sse_clients(server, ["expiring"], check_parked_s=0.3) as (hub, writer, [reader]):
            assert hub.parked_streams == 1
            await asyncio.sleep(0.5)
            assert not reader.done()  # parked: it waits without checking
            await writer.delete(keys.job("expiring"))
            async with asyncio.timeout(5):
                with pytest.raises(StopAsyncIteration):
                    await reader
            assert hub.parked_streams == 0 and hub.open_subscriptions == 0

    run(test)


def test_a_long_backlog_is_checked_in_small_batches_spread_over_the_interval(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 parked streams, batches of 10 (1,000 in production), a pass every 1 s: every check
    carries at most 10 jobs, so the reader never pauses for the whole backlog, and the checks
    cover every job within two passes of the first."""
    from services.api import events

    monkeypatch.setattr(events, "CHECK_PARKED_BATCH", 10)

    async def test() -> None:
        writer = Redis.from_url(server.url, decode_responses=True)
        ids = [f"batched-{i}" for i in range(50)]
        for job_id in ids:
            await queue_job(writer, job_id)
        await writer.script_load(lua_scripts.NOT_QUEUED)  # no NOSCRIPT round in the commands
        async with hub_on(server, check_parked_s=1.0) as hub, \
                contextlib.AsyncExitStack() as stack:  # fmt: skip
            for job_id in ids:
                await stack.enter_async_context(hub.subscribe(job_id))
            assert hub.parked_streams == 50
            checked: set[str] = set()
            sizes: list[int] = []
            async with writer.monitor() as monitor:
                deadline = None  # two passes after the first check
                while deadline is None or time.monotonic() < deadline:
                    async with asyncio.timeout(5):
                        words = (await monitor.next_command())["command"].split()
                    if words[0].upper() == "EVALSHA":
                        deadline = deadline or time.monotonic() + 2.0
                        sizes.append(int(words[2]))
                        checked.update(words[3 : 3 + int(words[2])])
                    elif deadline and words[0].upper() == "XREAD":
                        sizes.append(0)  # a read between two checks
            checks = [size for size in sizes if size]
            assert checks and max(checks) <= 10, sizes
            assert all(a == 0 or b == 0 for a, b in zip(sizes, sizes[1:])), sizes  # interleaved
            assert checked == {keys.job(job_id) for job_id in ids}
        await writer.aclose()

    run(test)


async def store_done(redis: Redis, job_id: str) -> None:
    await redis.hset(keys.job(job_id), "status", "succeeded")
    await redis.xadd(keys.events(job_id), {"type": "done", "status": "succeeded"})


def test_a_stream_whose_cancel_a_call_swallowed_ends_at_its_next_wait(server: RedisServer) -> None:
    """A cancel that a Redis call lost (Python 3.11's wait_for does, in redis-py's send path)
    still ends the stream when it next waits for entries, not after its 30 s wait."""

    async def test() -> None:
        async with hub_on(server) as hub:

            async def client() -> None:
                async with hub.subscribe("swallowed") as sub:
                    asyncio.current_task().cancel()  # type: ignore[union-attr]
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.sleep(1)  # stands in for the call that lost the cancel
                    await sub.next(30)

            task = asyncio.create_task(client())
            done, _ = await asyncio.wait({task}, timeout=5)
            task.cancel()
            assert task in done and task.cancelled()
            assert hub.open_subscriptions == 0

    run(test)
