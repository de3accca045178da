"""A worker whose engine hangs mid-job (a decode step that never returns: a wedged GPU, a
deadlock) is treated as dead: past LLM_ENGINE_STALL_S it drops its heartbeat, hands its job back
to the front of the queue and exits, and a healthy worker runs the job to its result before the
jobs queued behind it.

Real Redis and real Celery worker processes. The hang is injected into one worker only, by the
bootstrap below (nothing in the services knows about it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.common import keys
from services.common.celery_config import make_celery
from services.common.jobs import JobRecord, JobRequest
from services.common.settings import Settings
from services.worker.token_sink import streamed
from tests.helpers.redis_server import RedisServer
from tests.helpers.services import REPO, WorkerProcess, make_model_dir, service_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Runs `celery ...` with every decode step blocked forever, as a hung kernel would block it.
HUNG_ENGINE = """
import sys, threading
import lmcore.engine

def _hung(self, *args, **kwargs):
    threading.Event().wait()

lmcore.engine.Engine._run_step = _hung
from celery.__main__ import main
sys.exit(main())
"""


class HungWorker(WorkerProcess):
    def command(self) -> list[str]:
        celery_args = super().command()[3:]  # after [python, -m, celery]
        return [sys.executable, "-c", HUNG_ENGINE, *celery_args]


def healthcheck(worker: WorkerProcess) -> int:
    """The worker's probe with its environment, on this host: its exit code."""
    return subprocess.run(
        [sys.executable, "-m", "services.worker.healthcheck"], env=worker.env, cwd=REPO,
        capture_output=True, timeout=60,
    ).returncode  # fmt: skip


def test_a_worker_whose_engine_hangs_exits_and_its_job_runs_next_ahead_of_the_backlog(
    tmp_path: Path,
) -> None:
    from lmcore.checkpoint import load_model_dir
    from lmcore.generate import SamplingParams, generate

    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    model_dir = make_model_dir(tmp_path / "model")
    # The visibility timeout stays an hour: the job must come back at once, not after it.
    env = service_env(redis_server.url, model_dir, LLM_ENGINE_STALL_S=2, LLM_LEASE_TTL_S=2,
                      LLM_HEARTBEAT_S=0.5)  # fmt: skip
    # One job at a time each: the backlog stays in the queue, and the order it runs in shows.
    hung = HungWorker("hung", env, tmp_path / "logs", concurrency=1)
    healthy = WorkerProcess("healthy", env, tmp_path / "logs", concurrency=1)
    celery = make_celery(Settings(redis_url=redis_server.url))
    request = JobRequest(prompt="First Citizen:", max_new_tokens=24, eos=False, seed=3)
    try:
        hung.start(redis_server.url)
        redis = redis_server.client()
        job_id = "on-a-hung-engine"
        redis.hset(keys.job(job_id), mapping=JobRecord.new(job_id, request).to_hash())
        celery.send_task(keys.TASK_NAME, args=[job_id], task_id=job_id, queue=keys.QUEUE)
        # The prefill streams its first token; the first decode step never returns.
        wait_until(lambda: redis.xlen(keys.events(job_id)) > 0, 30, message="first token")
        backlog = [f"queued-behind-{i}" for i in range(2)]  # sent while the job is running
        for other in backlog:
            redis.hset(keys.job(other), mapping=JobRecord.new(other, request).to_hash())
            celery.send_task(keys.TASK_NAME, args=[other], task_id=other, queue=keys.QUEUE)

        wait_until(lambda: not hung.alive, 60, 0.1,
                   "the hung worker's exit (before: it stayed up, the job `running`)")  # fmt: skip
        assert hung.wait() == 1  # the hard exit after its warm shutdown
        assert not redis.exists(keys.worker(hung.nodename))  # its heartbeat is gone
        assert healthcheck(hung) == 1  # no healthy worker left on this host
        log = hung.log_path.read_text()
        assert "ERROR" in log and "engine stalled" in log
        record = redis.hgetall(keys.job(job_id))
        assert (record["status"], record["attempts"]) == ("running", "1")
        assert redis.llen(keys.QUEUE) == 3 and not redis.hlen("unacked")  # back in the queue,
        # at the end workers BRPOP from (before: the other end, behind the backlog)
        assert json.loads(redis.lindex(keys.QUEUE, -1))["headers"]["id"] == job_id

        healthy.start(redis_server.url)
        final = wait_until(lambda: (r := redis.hgetall(keys.job(job_id)))["status"] not in
                           ("queued", "running") and r, 60, 0.1, "the job's result")  # fmt: skip
        assert (final["status"], final["attempts"]) == ("succeeded", "2"), final
        loaded = load_model_dir(model_dir)
        params = SamplingParams(**request.sampling_kwargs())
        assert final["text"] == generate(loaded.model, loaded.tokenizer, [request.prompt],
                                         params)[0].text  # fmt: skip
        events = redis.xrange(keys.events(job_id))
        assert [f["type"] for _, f in events].count("done") == 1
        assert streamed(events) == (final["text"], 24)  # what a client read adds up to it
        for other in backlog:  # taken only once the handed-back job had its result
            done = wait_until(lambda: (r := redis.hgetall(keys.job(other)))["status"]
                              not in ("queued", "running") and r, 60, 0.1, "a backlog result")
            assert done["status"] == "succeeded", done
            assert float(done["started_at"]) >= float(final["finished_at"])
    finally:
        celery.close()
        hung.stop()
        healthy.stop()
        redis_server.stop()
