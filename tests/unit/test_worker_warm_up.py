"""A GPU worker compiles its decode step before taking jobs, and falls back to eager if it can't."""

from __future__ import annotations

import pytest

from lmcore.engine import Engine
from lmcore.generate import decode_step
from services.worker.runtime import WorkerRuntime
from tests.helpers.models import context_sensitive_model

pytestmark = pytest.mark.unit


def test_warm_up_runs_a_decode_step_through_the_engine() -> None:
    steps = []

    def counting_step(*args):
        steps.append(1)
        return decode_step(*args)

    engine = Engine(context_sensitive_model(0), max_batch=2, step_fn=counting_step)
    engine.start()
    try:
        assert WorkerRuntime._warm_up(engine) is True
        assert steps and engine.stats.finished == 1
    finally:
        engine.stop()


def test_a_warm_up_that_fails_reports_it_instead_of_raising() -> None:
    def broken_step(*args):
        raise RuntimeError("no compiler in this image")

    engine = Engine(context_sensitive_model(0), max_batch=2, step_fn=broken_step)
    engine.start()
    try:
        assert WorkerRuntime._warm_up(engine) is False
        assert engine.stats.failed == 1
    finally:
        engine.stop()


def test_a_runtime_whose_start_never_ran_stops_cleanly() -> None:
    # Celery calls stop at shutdown even when the model never loaded (start raised early).
    from services.common.settings import Settings

    runtime = WorkerRuntime(Settings(redis_url="redis://127.0.0.1:1"), "never-started")
    runtime.stop(timeout_s=1)  # raised "cannot join thread before it is started"
    assert runtime.engine is None
