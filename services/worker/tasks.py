"""The Celery task body: claim a job, run it on the engine, record exactly one result.

A redelivered task whose job is final returns at once; a live owner's lease keeps a duplicate
delivery waiting instead of running twice; the final status is written once (a Lua script).
While the engine runs the job, the worker's JobStreamer streams its chunks and watches cancel.
"""

from __future__ import annotations

import logging
import time
import uuid

import redis

from lmcore.engine import EngineRequest, EngineStoppedError
from lmcore.generate import SamplingParams
from services.common import keys, lua_scripts
from services.common.jobs import FINAL_STATUSES, JobRecord, JobStatus, ModelRef, model_fields
from services.common.lua_scripts import claim_call, finish_args
from services.common.stats import finish_increments
from services.worker.job_supervisor import ActiveJob
from services.worker.runtime import EngineStalledError, WorkerRuntime
from services.worker.token_sink import TokenSink, streamed

log = logging.getLogger(__name__)
LEASE_WAIT_S = 0.5
STALL_POLL_S = 0.5  # how often a task waiting on the engine checks whether it stalled
FINISH_RETRY_S = 120.0  # keep trying to record a result while Redis is away


def run_job(runtime: WorkerRuntime, job_id: str) -> str:
    """Run one job to its final status (or find it final already); returns the status."""
    _check_not_stalled(runtime, job_id)
    owner = f"{runtime.nodename}:{uuid.uuid4().hex[:12]}"
    claimed = _claim(runtime, job_id, owner)
    if claimed != "claimed":
        return claimed
    return JobExecution(runtime, job_id, owner).run()


def _check_not_stalled(runtime: WorkerRuntime, job_id: str) -> None:
    """Raise EngineStalledError once this worker's engine has stalled: the job goes back to the
    queue (untouched, or `running` under a lease that expires) for a healthy worker."""
    if runtime.stalled.is_set():
        raise EngineStalledError(f"job {job_id}: this worker's engine stalled; the job goes "
                                 "back to the queue")  # fmt: skip


def _claim(runtime: WorkerRuntime, job_id: str, owner: str) -> str:
    """'claimed', a final status, 'missing', or 'leased' (gave up waiting on a live owner)."""
    settings = runtime.settings
    give_up = time.monotonic() + settings.job_time_limit_s + settings.lease_ttl_s
    while True:
        reply = runtime.claim(**claim_call(job_id, owner, now=time.time(),
                                           lease_ttl_s=settings.lease_ttl_s,
                                           ttl_s=settings.job_ttl_s))  # fmt: skip
        kind = reply[0]
        if kind == "missing":
            log.warning("job %s has no record (expired?); dropping it", job_id)
            return kind
        if kind == "claimed" or kind in {s.value for s in FINAL_STATUSES}:
            return kind
        # Another worker is alive and running it (a duplicate delivery): wait for its result.
        if time.monotonic() > give_up:
            log.error("job %s still leased by %s; giving up this delivery", job_id, reply[1])
            return "leased"
        _check_not_stalled(runtime, job_id)
        time.sleep(LEASE_WAIT_S)


class JobExecution:
    def __init__(self, runtime: WorkerRuntime, job_id: str, owner: str) -> None:
        self.rt = runtime
        self.job_id = job_id
        self.owner = owner
        self.redis = runtime.redis
        self.ttl_s = runtime.settings.job_ttl_s
        self.active: ActiveJob | None = None

    def run(self) -> str:
        record = JobRecord.from_hash(self.redis.hgetall(keys.job(self.job_id)))
        already, already_tokens = "", 0
        if record.attempts > 1:  # a redelivery: clients may hold part of the text
            already, already_tokens = streamed(self.redis.xrange(keys.events(self.job_id)))
        if record.cancel_requested:
            return self._finish(record, JobStatus.cancelled, text=already, tokens=already_tokens,
                                reason="cancelled")
        try:
            params = SamplingParams(**record.request.sampling_kwargs())
        except ValueError as exc:
            return self._finish(record, JobStatus.failed, error=f"invalid request: {exc}")
        sink = TokenSink(already, already_tokens)
        engine, streamer = self.rt.engine, self.rt.streamer
        assert engine is not None and streamer is not None
        submitted = time.monotonic()
        try:
            handle = engine.submit(EngineRequest(
                prompt=record.request.prompt, params=params, request_id=self.job_id,
                on_token=sink.on_token, truncate=record.request.truncate,
            ))  # fmt: skip
        except EngineStoppedError as exc:  # the engine thread died: this worker shuts down
            return self._finish(record, JobStatus.failed, text=already, tokens=already_tokens,
                                error=f"the worker's engine stopped ({exc}); submit it again")

        self.active = ActiveJob(self.job_id, self.owner, handle, sink,
                                deadline=submitted + self.rt.settings.job_time_limit_s)
        streamer.add(self.active)
        try:
            # Meanwhile the streamer streams, cancels, renews and times out. A stalled engine
            # never finishes the job: it goes back to the queue, its lease no longer renewed.
            while not handle.wait(STALL_POLL_S):
                _check_not_stalled(self.rt, self.job_id)
        finally:
            streamer.remove(self.active)
        if self.active.outcome == "lost":
            log.warning("job %s: lease lost to another worker; it records the result", self.job_id)
            return "lost"
        engine_s = (handle.finished_at or time.monotonic()) - submitted
        model = ModelRef.model_validate(handle.metadata) if handle.metadata else None
        first = sink.first_token_at
        if first is None and handle.first_token_at is not None:  # an eos first: no token to see
            first = time.time() - (time.monotonic() - handle.first_token_at)
        try:
            generation = handle.result(timeout=0)
        except Exception as exc:  # non-finite logits, a failed step, the engine thread's death
            # Like a time limit: it records the text made until then, which clients hold.
            text, tokens = sink.held()
            return self._finish(record, JobStatus.failed, text=text, tokens=tokens,
                                error=str(exc), first_token_at=first, engine_s=engine_s,
                                model=model)  # fmt: skip
        status, error = JobStatus.succeeded, None
        if generation.finish_reason == "cancelled":
            status = JobStatus.cancelled
            if self.active.outcome == "timeout":
                status = JobStatus.failed
                error = f"time limit of {self.rt.settings.job_time_limit_s:g} s exceeded"
        return self._finish(
            record, status, text=generation.text, reason=generation.finish_reason,
            tokens=len(generation.token_ids), prompt_tokens=generation.prompt_tokens,
            error=error, first_token_at=first, engine_s=engine_s, model=model,
        )  # fmt: skip

    def _finish(
        self,
        record: JobRecord,
        status: JobStatus,
        *,
        text: str = "",
        reason: str | None = None,
        tokens: int = 0,
        prompt_tokens: int | None = None,
        error: str | None = None,
        first_token_at: float | None = None,
        engine_s: float | None = None,
        model: ModelRef | None = None,
    ) -> str:
        """Record the final status once (with the last chunks), retrying while Redis is away."""
        now = time.time()
        fields = {"finished_at": repr(now), "text": text, "completion_tokens": str(tokens)}
        optional = {
            "finish_reason": reason,
            "prompt_tokens": prompt_tokens,
            "error": error,
            "engine_s": None if engine_s is None else round(engine_s, 6),
            "first_token_at": None if first_token_at is None else repr(first_token_at),
        }
        fields.update({k: str(v) for k, v in optional.items() if v is not None})
        if model is not None:
            fields.update(model_fields(model))
        counters, sums = finish_increments(
            status.value, tokens, now - record.created_at,
            None if first_token_at is None else first_token_at - record.created_at,
        )
        args = finish_args(self.owner, status.value, self.ttl_s, fields, counters, sums)
        give_up = time.monotonic() + FINISH_RETRY_S
        while True:
            try:
                pipe = self.redis.pipeline(transaction=True)  # last chunks and result together
                # A job that ended ends its stream holding the text and tokens it records (a
                # failed or timed-out one: what it made until then, which may be nothing).
                chunks = self.active.take(final=True) if self.active is not None else []
                if chunks:  # written only if the job is still ours, as FINISH checks too
                    self.rt.streamer.stream(keys=lua_scripts.job_keys(self.job_id), client=pipe,
                                            args=lua_scripts.stream_args(
                                                self.owner, self.ttl_s, chunks, None,
                                                self.active.sent_chunks))  # fmt: skip
                self.rt.finish(
                    keys=[keys.job(self.job_id), keys.events(self.job_id),
                          keys.lease(self.job_id), keys.STATS],
                    args=args, client=pipe,
                )  # fmt: skip
                written = pipe.execute()[-1]
                if self.active is not None:
                    self.active.sent(len(chunks))
                break
            except redis.RedisError as exc:
                if time.monotonic() > give_up:
                    raise
                log.warning("job %s: cannot record result yet: %s", self.job_id, exc)
                time.sleep(1.0)
        if not written:
            log.info("job %s already had a result; this attempt's is dropped", self.job_id)
            return "lost"
        if status is JobStatus.failed:  # the only place its cause is logged (Celery: "succeeded")
            log.warning("job %s failed: %s (%d tokens)", self.job_id, error, tokens)
        return status.value
