"""What a finished job keeps in Redis for its TTL, on a Redis started with the command line of
`lmctl stack up` (services.stack.redis_command; the chart and compose set the same stream node
size): its events stream must not hold the 4 KB node Redis allocates for a stream by default.

A real Redis and the worker runtime in this process (no Celery), running one short job.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from services.common import keys
from services.common.jobs import JobRecord, JobRequest
from services.common.settings import Settings
from services.stack import redis_command
from services.worker.runtime import WorkerRuntime
from services.worker.tasks import run_job
from tests.helpers.redis_server import RedisServer
from tests.helpers.services import make_model_dir

pytestmark = pytest.mark.integration

# Half the 4096-byte node Redis starts a stream with by default (there the stream took 4784 B).
EVENTS_STREAM_BOUND = 2048


class StackRedis(RedisServer):
    """A test Redis (free port, own folder, stopped by the test) run with the stack's argv."""

    def command(self) -> list[str]:
        return [*redis_command(self.port, "127.0.0.1", self.root), "--logfile", str(self.log_path)]


def test_a_finished_jobs_events_stream_holds_no_4kb_stream_node(tmp_path: Path) -> None:
    server = StackRedis(tmp_path / "redis")
    server.start()
    try:
        settings = Settings(redis_url=server.url, compile_decode="false",
                            model_uri=str(make_model_dir(tmp_path / "model")))  # fmt: skip
        runtime = WorkerRuntime(settings, "w1", on_engine_death=lambda: None)
        runtime.start()
        client = server.client()
        job_id = uuid.uuid4().hex
        request = JobRequest(prompt="First", max_new_tokens=4, eos=False)
        client.hset(keys.job(job_id), mapping=JobRecord.new(job_id, request).to_hash())
        try:
            assert run_job(runtime, job_id) == "succeeded"
        finally:
            runtime.stop(timeout_s=5)

        events = client.xrange(keys.events(job_id))
        assert [f["type"] for _, f in events][-1] == "done" and len(events) >= 2
        # SAMPLES 0: every node counted, not an estimate.
        assert client.memory_usage(keys.events(job_id), samples=0) < EVENTS_STREAM_BOUND
    finally:
        server.stop()
