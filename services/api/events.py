"""One Redis reader for every open event stream (`GET /jobs/{id}/events`) of this API process.

Each SSE client used to run its own `XREAD BLOCK` loop: a pooled Redis connection held for as long
as its stream stayed open, and one command per token chunk per stream. The hub reads every
subscribed stream with a single XREAD on one dedicated connection and hands each subscription the
entries after its own cursor, so a batch of jobs decoding together costs one command per round of
chunks and one connection however many clients stream. A new subscription wakes the blocked read
(`CLIENT UNBLOCK`), so its first events never wait for the others' block to time out.

A queued job's stream stays empty until a worker claims the job or it is cancelled, and a backlog
can hold thousands of clients waiting on queued jobs. So those streams are parked: left out of the
reads, which carry instead the one stream (keys.LEFT_QUEUE) where the claim and cancel scripts
name each job leaving the queue; its name unparks its stream. Their clients do not poll their
jobs either: the hub checks every parked stream's job every few seconds (NOT_QUEUED script calls
of up to CHECK_PARKED_BATCH jobs, spread between its reads), in case a job left the queue
unannounced (a worker older than the announcement) or its record expired, and unparks those.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, KeysView
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from services.common import keys, lua_scripts

Entry = tuple[str, dict[str, str]]
log = logging.getLogger(__name__)
WAKE_TRIES = 50  # CLIENT UNBLOCK attempts 2 ms apart while the reader's XREAD reaches Redis
# Where CLIENT commands are not allowed (an ACL, or a managed Redis that disables them) nothing
# can wake the read, so it blocks this briefly and new subscriptions join at the next round.
SHORT_BLOCK_MS = 50
CHECK_PARKED_S = 2.0  # how often each parked stream's job is checked
# Jobs per NOT_QUEUED call. The calls of one pass are spread over CHECK_PARKED_S, one between two
# reads, so however long the backlog the reader pauses for one batch at a time (~5 ms).
CHECK_PARKED_BATCH = 1000


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream id "ms-seq" as a sortable pair ("0-0" sorts first)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class Subscription:
    """One reader of one job's stream; `cursor` is the last entry id handed to it.

    Its inbox holds lists of entries, the RedisError that stopped the hub's read, or None: the
    stream was unparked (a wake-up with nothing to hand over).
    """

    key: str
    cursor: str
    sync_wait: bool = False  # a seed endpoint waiting for `done` (EventHub.wait_done), not SSE
    parked_keys: KeysView[str] | frozenset[str] = frozenset()  # the hub's, kept current by it
    inbox: asyncio.Queue[list[Entry] | RedisError | None] = field(default_factory=asyncio.Queue)
    closing: bool = False  # set by close_soon: every wait ends at once

    def close_soon(self) -> None:
        """End the pending wait, and every later one, at once with [] (the server is stopping:
        its reader ends the stream cleanly and the client resumes elsewhere)."""
        self.closing = True
        self.inbox.put_nowait(None)

    @property
    def parked(self) -> bool:
        """Whether its job is queued: the hub leaves the stream out of its reads and watches the
        job itself."""
        return self.key in self.parked_keys

    async def next(self, timeout_s: float, *, no_timeout_while_parked: bool = False) -> list[Entry]:
        """The next entries after the cursor, waiting up to timeout_s ([] when none came).

        With no_timeout_while_parked the wait does not end while the stream is parked (the hub
        watches queued jobs, so an SSE stream has no reason to check on its job then); timeout_s
        counts from the moment the stream is unparked.

        Raises the RedisError that stopped the hub's read: the stream should end, and the client
        reconnect with Last-Event-ID.
        """
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cancelled, but a Redis call swallowed it (Python 3.11's wait_for, in redis-py's
            # send path, can): end now rather than wait on as a stream nobody reads.
            raise asyncio.CancelledError
        while True:
            if self.closing:
                return []
            try:
                if no_timeout_while_parked and self.parked:
                    item = await self.inbox.get()  # no timer per parked client
                else:
                    item = await asyncio.wait_for(self.inbox.get(), timeout_s)
            except TimeoutError:
                return []
            if item is None:
                continue  # unparked (wait again, now with the timeout) or closing
            if isinstance(item, RedisError):
                raise item
            return item


class EventHub:
    """Subscriptions to job streams, served by one reader task while any is open.

    `reader` must be a client of its own, holding one connection (single_connection_client) with
    no retries, so the id that CLIENT UNBLOCK names is the connection the XREAD blocks on;
    `redis` (the API's pool) sends the CLIENT UNBLOCK and the status checks. Per round the reader
    touches only the streams Redis answered for; a stream costs the read one argument while its
    job runs and none while it is queued (`park_queued`; False reads every stream every round).
    Every `check_parked_s` each parked stream's job is checked once, in batches spread over it.
    """

    def __init__(
        self, redis: Redis, reader: Redis, *, block_ms: int = 2000, count: int = 256,
        park_queued: bool = True, check_parked_s: float = CHECK_PARKED_S,
    ) -> None:  # fmt: skip
        self._redis = redis
        self._reader = reader
        self._block_ms = block_ms
        self._count = count
        self._park_queued = park_queued
        self._check_parked_s = check_parked_s
        self._not_queued = redis.register_script(lua_scripts.NOT_QUEUED)
        self._by_key: dict[str, set[Subscription]] = {}
        self._cursors: dict[str, str] = {}  # streams read every round -> earliest cursor
        self._parked: dict[str, str] = {}  # streams of queued jobs, left out of reads -> job id
        self._left_queue_cursor: str | None = None  # read every round once set
        self._left_queue_lookup: asyncio.Future[list] | None = None
        self._next_check = time.monotonic() + check_parked_s
        self._to_check: list[tuple[str, str]] = []  # the rest of this pass over parked jobs
        self._check_every_s = check_parked_s  # between two batches of this pass
        self._task: asyncio.Task[None] | None = None
        self._reader_id: int | None = None
        self._in_read: dict[str, str] | None = None  # the cursors of the pending XREAD
        self._can_unblock = True  # False once Redis refused a CLIENT command

    @property
    def open_subscriptions(self) -> int:
        """Event streams (SSE) open; the seed endpoints' waits are `open_waits`."""
        return sum(not sub.sync_wait for subs in self._by_key.values() for sub in subs)

    @property
    def open_waits(self) -> int:
        """Seed endpoint requests waiting for their job's `done` (`wait_done`)."""
        return sum(sub.sync_wait for subs in self._by_key.values() for sub in subs)

    @property
    def parked_streams(self) -> int:
        """Redis streams left out of reads while their job is queued (any subscriber)."""
        return len(self._parked)

    @property
    def parked_event_streams(self) -> int:
        """Parked Redis streams that an event stream (SSE) waits on, for /metrics: a seed
        endpoint's wait on a queued job is parked too, but counted with `open_waits` alone."""
        return sum(
            any(not sub.sync_wait for sub in self._by_key.get(key, ())) for key in self._parked
        )

    @contextlib.asynccontextmanager
    async def subscribe(
        self, job_id: str, after: str = "0-0", *, sync_wait: bool = False
    ) -> AsyncIterator[Subscription]:
        """Entries of job_id's stream after id `after`, for as long as the context is open.
        `sync_wait`: for wait_done (counted apart from the SSE streams).

        Raises RedisError when Redis cannot be asked whether the job is still queued.
        """
        sub = Subscription(keys.events(job_id), after, sync_wait, self._parked.keys())
        first = sub.key not in self._by_key
        self._by_key.setdefault(sub.key, set()).add(sub)
        try:
            if first and self._park_queued:
                await self._park_if_queued(job_id, sub.key)
            self._update_cursor(sub.key)
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._read_loop(), name="event-hub")
            elif sub.key not in self._parked:
                await self._wake(sub)
            yield sub
        finally:
            subs = self._by_key.get(sub.key, set())
            subs.discard(sub)  # the reader stops reading its stream from the next round
            if not subs:
                self._by_key.pop(sub.key, None)
                self._parked.pop(sub.key, None)
            self._update_cursor(sub.key)

    async def wait_done(self, job_id: str, timeout_s: float) -> bool:
        """Whether job_id's stream gets its `done` entry within timeout_s (it may have it already).

        Raises RedisError when Redis cannot be read (the API answers 503).
        """
        deadline = time.monotonic() + timeout_s
        async with self.subscribe(job_id, sync_wait=True) as sub:
            while (left := deadline - time.monotonic()) > 0:
                if any(fields.get("type") == "done" for _, fields in await sub.next(left)):
                    return True
        return False

    async def close(self) -> None:
        task = self._task
        # Cancelled again until it ends: on Python 3.11 asyncio.wait_for, which redis-py sends
        # commands through, loses a cancellation that lands as the send completes, and the
        # reader would then block until its socket timeout.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        await self._reader.aclose()

    async def _park_if_queued(self, job_id: str, key: str) -> None:
        """Leave key out of the reads while its job is queued.

        The key is parked before the status check, so an announcement on keys.LEFT_QUEUE made
        after the check finds it parked; one made before it means the check sees the job gone
        from the queue. The LEFT_QUEUE cursor is taken before the first check for the same reason.
        """
        self._parked[key] = job_id
        try:
            if self._left_queue_cursor is None:
                await self._start_reading_left_queue()
            status = await self._redis.hget(keys.job(job_id), "status")
        except BaseException:
            self._parked.pop(key, None)
            raise
        if status != "queued":
            self._unpark(key)

    async def _start_reading_left_queue(self) -> None:
        """Set the LEFT_QUEUE cursor to its newest entry: one XREVRANGE however many
        subscriptions wait for it (a burst of new clients would each send one)."""
        if self._left_queue_lookup is None or self._left_queue_lookup.done():
            self._left_queue_lookup = asyncio.ensure_future(
                self._redis.xrevrange(keys.LEFT_QUEUE, count=1)
            )
        last = await asyncio.shield(self._left_queue_lookup)
        if self._left_queue_cursor is None:
            self._left_queue_cursor = last[0][0] if last else "0-0"

    def _unpark(self, key: str) -> None:
        """Read key from the next round on, and start its subscriptions' timeouts."""
        if self._parked.pop(key, None) is not None:
            self._update_cursor(key)
            for sub in self._by_key.get(key, ()):
                sub.inbox.put_nowait(None)

    def _update_cursor(self, key: str) -> None:
        subs = self._by_key.get(key)
        if key in self._parked:
            return  # not read while parked
        if subs:
            self._cursors[key] = min((s.cursor for s in subs), key=entry_order)
        else:
            self._cursors.pop(key, None)

    async def _check_parked(self) -> None:
        """Check the next batch of parked jobs, and unpark the streams of those not queued any
        more: claimed or cancelled with no announcement (by a worker or an API older than it),
        or expired. A pass over every parked job takes check_parked_s."""
        if not self._to_check:
            self._to_check = list(self._parked.items())
            batches = -(-len(self._to_check) // CHECK_PARKED_BATCH)
            self._check_every_s = self._check_parked_s / max(batches, 1)
        batch = [item for item in self._to_check[-CHECK_PARKED_BATCH:] if item[0] in self._parked]
        del self._to_check[-CHECK_PARKED_BATCH:]
        self._next_check = time.monotonic() + self._check_every_s
        if not batch:
            return  # all closed or unparked since the pass began
        # A job never goes back to `queued`, so an answer stays true while others park.
        for index in await self._not_queued(keys=[keys.job(job) for _, job in batch]):
            self._unpark(batch[int(index) - 1][0])

    def _streams_to_read(self) -> tuple[dict[str, str], int]:
        """This round's streams and cursors, and how long it may block (ms)."""
        streams = dict(self._cursors)
        if self._left_queue_cursor is not None:
            streams[keys.LEFT_QUEUE] = self._left_queue_cursor
        block = self._block_ms if self._can_unblock else min(self._block_ms, SHORT_BLOCK_MS)
        if self._parked:  # wake up for the next check
            until_check_ms = int((self._next_check - time.monotonic()) * 1000)
            block = min(block, max(1, until_check_ms))
        return streams, block

    def _covers(self, pending: dict[str, str], sub: Subscription) -> bool:
        cursor = pending.get(sub.key)
        return cursor is not None and entry_order(cursor) <= entry_order(sub.cursor)

    async def _wake(self, sub: Subscription) -> None:
        """Have a blocked XREAD return now so the next one covers `sub`.

        CLIENT UNBLOCK answers 0 when the reader is not blocked yet (its XREAD still on the way),
        so it is retried for a few ms; once the pending read covers `sub`, or no read is pending,
        there is nothing to wake.
        """
        for _ in range(WAKE_TRIES):
            pending, reader_id = self._in_read, self._reader_id
            if pending is None or self._covers(pending, sub) or reader_id is None:
                return
            try:
                if await self._redis.client_unblock(reader_id):
                    return
            except ResponseError:
                self._can_unblock = False  # refused: short blocks from the next round on
                return
            except RedisError:
                return  # the reader meets the same outage and tells every subscription
            await asyncio.sleep(0.002)

    async def _read_loop(self) -> None:
        failures = 0
        while self._by_key:
            try:
                if self._reader_id is None and self._can_unblock:
                    self._reader_id = await self._client_id()
                if self._parked and time.monotonic() >= self._next_check:
                    await self._check_parked()
                streams, block = self._streams_to_read()
                if not streams:  # only a stream being parked, its LEFT_QUEUE cursor on the way
                    await asyncio.sleep(0.005)
                    continue
                self._in_read = streams
                reply = await self._reader.xread(streams, count=self._count, block=block)
            except Exception as exc:  # noqa: BLE001 - a reader that died would starve every stream
                if not isinstance(exc, RedisError):
                    log.exception("event stream reader failed; ending the open streams")
                    exc = RedisError(f"event stream reader failed: {exc!r}")
                self._reader_id = None  # a new connection gets a new id
                for subs in list(self._by_key.values()):
                    for sub in subs:
                        sub.inbox.put_nowait(exc)
                failures += 1
                await asyncio.sleep(min(0.05 * 2**failures, 1.0))
                continue
            finally:
                self._in_read = None
            failures = 0
            self._deliver(reply or [], streams)

    async def _client_id(self) -> int | None:
        try:
            return int(await self._reader.client_id())
        except ResponseError:  # not a lost connection: this Redis does not allow CLIENT
            log.warning("Redis refuses CLIENT commands; event streams poll every %d ms instead",
                        SHORT_BLOCK_MS)  # fmt: skip
            self._can_unblock = False
            return None

    def _deliver(self, reply: list | dict, read_from: dict[str, str]) -> None:
        """Hand each subscription of the streams in the reply the entries past its cursor, and
        unpark the streams of jobs that left the queue. `read_from`: the read's cursors. A
        subscription behind its stream's cursor (it joined while the read was pending, and the
        wake came too late) gets nothing now: the next read starts from its cursor."""
        for key, entries in reply.items() if isinstance(reply, dict) else reply:  # RESP3 / 2
            if key == keys.LEFT_QUEUE:
                for _, fields in entries:
                    self._unpark(keys.events(fields.get("job", "")))
                self._left_queue_cursor = entries[-1][0]
                continue
            subs = self._by_key.get(key)
            if not subs:
                continue  # closed while the read was pending
            read_after = entry_order(read_from.get(key, "0-0"))
            for sub in subs:
                after = entry_order(sub.cursor)
                if after < read_after:
                    continue  # the read skipped entries this one has not had
                new = [(i, fields) for i, fields in entries if entry_order(i) > after]
                if new:
                    sub.cursor = new[-1][0]
                    sub.inbox.put_nowait(new)
            self._update_cursor(key)
