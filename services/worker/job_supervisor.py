"""One thread per worker that streams every running job's token chunks to Redis in one pipeline.

Every FLUSH_S it appends each job's new chunks to its stream, reads its cancel flag, renews its
lease and enforces its time limit, so task threads just wait on the engine. It must not write
final results (tasks.py does, exactly once).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import redis

from lmcore.engine import EngineHandle
from services.common import keys, lua_scripts
from services.worker.token_sink import Chunk, TokenSink

log = logging.getLogger(__name__)
FLUSH_S = 0.02


@dataclass
class ActiveJob:
    job_id: str
    owner: str
    handle: EngineHandle
    sink: TokenSink
    deadline: float  # time.monotonic() after which the job is cancelled as timed out
    unsent: list[Chunk] = field(default_factory=list)  # taken from the sink, not yet in Redis
    sent_chunks: int = 0  # chunks in Redis: the index STREAM gets for unsent[0]
    first_token_recorded: bool = False
    last_renew: float = field(default_factory=time.monotonic)
    outcome: str = "done"  # "done" | "timeout" | "lost" (another worker owns the job now)

    def take(self, final: bool = False) -> list[Chunk]:
        self.unsent += self.sink.take(final)
        return list(self.unsent)

    def sent(self, n: int) -> None:
        del self.unsent[:n]
        self.sent_chunks += n


class JobStreamer:
    def __init__(self, client: redis.Redis, renew: object, lease_ttl_s: float, ttl_s: int) -> None:
        self.redis = client
        self.renew = renew  # the RENEW script, registered on client
        self.stream = client.register_script(lua_scripts.STREAM)
        self.lease_ttl_s = lease_ttl_s
        self.ttl_s = ttl_s
        self._jobs: dict[str, ActiveJob] = {}
        self._lock = threading.Lock()  # the job table
        self._flushing = threading.Lock()  # held for a whole flush: remove() waits for it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-streamer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # never started: the runtime's start() failed early
            self._thread.join(timeout=5)

    def add(self, job: ActiveJob) -> None:
        with self._lock:
            self._jobs[job.job_id] = job

    def remove(self, job: ActiveJob) -> None:
        """After this the streamer never touches `job` again (its chunks are the caller's)."""
        with self._flushing, self._lock:
            self._jobs.pop(job.job_id, None)

    def _loop(self) -> None:
        while not self._stop.wait(FLUSH_S):
            try:
                self.flush()
            except redis.RedisError as exc:
                # Generation goes on; chunks wait in `unsent` until Redis is back.
                log.warning("streaming to Redis failed: %s", exc)
            except Exception:
                log.exception("job streamer error")

    def flush(self) -> None:
        with self._flushing:
            with self._lock:
                jobs = list(self._jobs.values())
            if not jobs:
                return
            now = time.monotonic()
            pipe = self.redis.pipeline(transaction=False)
            plan = []
            for job in jobs:
                chunks = job.take()
                first = None if job.first_token_recorded else job.sink.first_token_at
                streamed = bool(chunks) or first is not None
                # Written only while the job is still ours: a worker that lost it (a long
                # partition, the job redelivered and finished elsewhere) must not add to it.
                if streamed:
                    self.stream(keys=lua_scripts.job_keys(job.job_id), client=pipe,
                                args=lua_scripts.stream_args(job.owner, self.ttl_s, chunks, first,
                                                             job.sent_chunks))
                pipe.hget(keys.job(job.job_id), "cancel_requested")
                renew = now - job.last_renew > self.lease_ttl_s / 3
                if renew:
                    self.renew(  # type: ignore[operator]
                        keys=lua_scripts.job_keys(job.job_id),
                        args=[job.owner, int(self.lease_ttl_s * 1000)], client=pipe,
                    )  # fmt: skip
                plan.append((job, len(chunks), streamed, first is not None, renew))
            results = iter(pipe.execute())
            for job, n_chunks, streamed, had_first, renewed in plan:
                ours = next(results) == 1 if streamed else True
                cancel_flag = next(results)
                if renewed:
                    job.last_renew = now
                    ours = ours and next(results) == 1
                if not ours:
                    job.outcome = "lost"
                    job.handle.cancel()
                    continue
                job.sent(n_chunks)
                if had_first:
                    job.first_token_recorded = True
                if cancel_flag == "1":
                    job.handle.cancel()
                elif now > job.deadline and job.outcome == "done":
                    job.outcome = "timeout"
                    job.handle.cancel()
