"""A job's chunks reach its stream once, even when Redis ran an append whose reply was lost.

The worker sends the same chunks again after such a failure (redis-py's Retry re-sends the
pipeline; the streamer keeps unsent chunks for its next flush); STREAM skips the ones this owner
already wrote. Real Redis, and a TCP proxy that cuts the connection before Redis's reply.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common import keys, lua_scripts
from services.common.jobs import JobRecord, JobRequest
from services.common.settings import Settings
from services.worker.job_supervisor import ActiveJob, JobStreamer
from services.worker.runtime import make_redis
from services.worker.token_sink import Chunk, TokenSink, streamed_text
from tests.helpers.redis_server import RedisServer, redis_server
from tests.helpers.services import free_port, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(Path(tmp_path_factory.mktemp("appends"))) as srv:
        yield srv


def running_job(client: redis.Redis, job_id: str) -> list[str]:
    record = JobRecord.new(job_id, JobRequest(prompt="a")).to_hash()
    client.delete(*lua_scripts.job_keys(job_id))
    client.hset(keys.job(job_id), mapping={**record, "status": "running"})
    return lua_scripts.job_keys(job_id)


def texts(client: redis.Redis, job_id: str) -> list[str]:
    return [f["text"] for _, f in client.xrange(keys.events(job_id))]


def test_chunks_sent_again_are_appended_once_and_a_new_owner_counts_its_own(
    server: RedisServer,
) -> None:
    client = server.client()
    stream = client.register_script(lua_scripts.STREAM)
    job = running_job(client, "again")
    first = [Chunk("token", "Hel", 1), Chunk("token", "lo", 1)]
    for _ in range(2):  # the second call: a retry of a call whose reply was lost
        assert stream(keys=job, args=lua_scripts.stream_args("w1", 60, first, None, 0)) == 1
    assert texts(client, "again") == ["Hel", "lo"]
    # A retry that carries the old chunks and a new one appends only the new one.
    more = [*first[1:], Chunk("token", " you", 1)]
    assert stream(keys=job, args=lua_scripts.stream_args("w1", 60, more, None, 1)) == 1
    assert texts(client, "again") == ["Hel", "lo", " you"]
    # A redelivery's owner numbers its chunks from 0 again, and they are written.
    assert stream(keys=job, args=lua_scripts.stream_args("w2", 60, [Chunk("reset", "Hi", 1)],
                                                        None, 0)) == 1  # fmt: skip
    assert texts(client, "again") == ["Hel", "lo", " you", "Hi"]


class ReplyLosingProxy:
    """TCP proxy to Redis. Once armed, it forwards the next request carrying `marker`, waits until
    `arrived()` says Redis ran it, then cuts both connections without relaying the reply."""

    def __init__(self, redis_port: int, marker: bytes, arrived: object) -> None:
        self.port = free_port()
        self.redis_port, self.marker, self.arrived = redis_port, marker, arrived
        self.armed = threading.Event()
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.redis_port))
            swallow = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, swallow), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, swallow),
                             daemon=True).start()  # fmt: skip

    def _up(self, src: socket.socket, dst: socket.socket, swallow: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                cut = self.armed.is_set() and self.marker in data
                if cut:
                    self.armed.clear()
                    swallow.set()
                dst.sendall(data)
                if cut:
                    wait_until(self.arrived, 10, 0.01, "Redis ran the request")
                    self.cuts += 1
                    break
        except OSError:
            pass
        for sock in (src, dst):
            sock.close()

    def _down(self, src: socket.socket, dst: socket.socket, swallow: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if not swallow.is_set():
                    dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()


class Handle:
    """The engine handle's part the streamer uses."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def test_a_flush_whose_reply_was_lost_streams_its_text_once(server: RedisServer) -> None:
    direct = server.client()
    running_job(direct, "lost-reply")
    proxy = ReplyLosingProxy(server.port, b"Hello",
                             lambda: direct.xlen(keys.events("lost-reply")) > 0)  # fmt: skip
    worker_redis = make_redis(Settings(redis_url=f"redis://127.0.0.1:{proxy.port}/0"))
    streamer = JobStreamer(worker_redis, worker_redis.register_script(lua_scripts.RENEW),
                           lease_ttl_s=30, ttl_s=3600)  # fmt: skip
    sink = TokenSink()
    job = ActiveJob("lost-reply", "w1", Handle(), sink, deadline=time.monotonic() + 3600)
    streamer.add(job)
    try:
        sink.on_token(1, "Hello ")
        proxy.armed.set()
        try:
            streamer.flush()  # Redis appends; the reply never comes; redis-py retries
        except redis.RedisError:
            pass  # or gives up: the chunk stays unsent for the next flush
        sink.on_token(2, "world")
        streamer.flush()
    finally:
        proxy.close()
        worker_redis.close()
    assert proxy.cuts == 1
    entries = direct.xrange(keys.events("lost-reply"))
    assert streamed_text(entries) == "Hello world"
    assert job.unsent == [] and not job.handle.cancelled
