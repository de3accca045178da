"""A job that ends `failed` leaves one WARNING in the worker's log naming the job and the cause
(Celery's own line says "succeeded ...: 'failed'", and nothing else named the cause).

A real Redis and the worker runtime in this process (no Celery), its decode step patched to be
slow or to fail.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcore.engine import Engine
from services.common import keys
from services.common.jobs import JobRecord, JobRequest
from services.common.settings import Settings
from services.worker.runtime import WorkerRuntime
from services.worker.tasks import run_job
from tests.helpers.redis_server import RedisServer, redis_server
from tests.helpers.services import make_model_dir

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis", appendonly=False) as srv:
        yield srv


def slow_step(self: Engine, *args: Any, **kwargs: Any) -> Any:
    time.sleep(0.05)  # a job of 100 tokens takes 5 s: far past its time limit
    return REAL_STEP(self, *args, **kwargs)


def failing_step(self: Engine, *args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("device fell over")


REAL_STEP = Engine._run_step


@pytest.mark.parametrize(("step", "cause"), [
    (slow_step, "time limit of 0.3 s exceeded"),
    (failing_step, "device fell over"),
], ids=["time-limit", "engine-failure"])  # fmt: skip
def test_a_failed_job_logs_one_warning_naming_the_job_and_its_cause(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, step: Any, cause: str,
) -> None:  # fmt: skip
    monkeypatch.setattr(Engine, "_run_step", step)
    settings = Settings(redis_url=server.url, model_uri=str(make_model_dir(tmp_path / "model")),
                        compile_decode="false", job_time_limit_s=0.3)  # fmt: skip
    runtime = WorkerRuntime(settings, "w1", on_engine_death=lambda: None)
    runtime.start()
    client = server.client()
    try:
        job_id = uuid.uuid4().hex
        request = JobRequest(prompt="hello", max_new_tokens=100, eos=False, seed=1)
        client.hset(keys.job(job_id), mapping=JobRecord.new(job_id, request).to_hash())
        caplog.set_level(logging.INFO, logger="services.worker")

        assert run_job(runtime, job_id) == "failed"

        assert cause in client.hget(keys.job(job_id), "error")
        named = [r for r in caplog.records if job_id in r.getMessage()]
        assert [r.levelname for r in named] == ["WARNING"]  # once, and not at INFO
        assert cause in named[0].getMessage()
    finally:
        runtime.stop(timeout_s=5)
