"""The worker's Celery app: shared config, the generate task, and the runtime's start and stop.

The model loads in `celeryd_after_setup`: after Celery has set up logging (in `worker_init`,
which comes first, every log line of the load was dropped) and before the consumer starts, so a
worker that cannot load takes no jobs. It loads in the worker's own process: run it with
`--pool threads` or `solo`, never prefork, so CUDA is never initialised before a fork.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Task
from celery.signals import celeryd_after_setup, worker_shutdown

from services.common import keys
from services.common.celery_config import make_celery
from services.common.settings import Settings
from services.worker import runtime as rt
from services.worker.tasks import run_job

log = logging.getLogger(__name__)
settings = Settings()
app = make_celery(settings, main="llm-worker")
app.conf.worker_pool = "threads"  # the default here; --pool solo works too, prefork never


@app.task(name=keys.TASK_NAME, bind=True, ignore_result=True)
def generate(self: Task, job_id: str) -> str:
    """Run job `job_id` (its request is in the job record); returns the final status."""
    return run_job(rt.get_runtime(), job_id)


def _requested_pool(argv: list[str]) -> str:
    """The --pool/-P given to `celery worker`, else the configured default."""
    for i, arg in enumerate(argv):
        if arg in ("-P", "--pool") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--pool="):
            return arg.split("=", 1)[1]
    return str(app.conf.worker_pool)


@celeryd_after_setup.connect
def _start_runtime(sender: Any = None, **_: Any) -> None:
    if _requested_pool(sys.argv) not in ("threads", "solo"):
        # SystemExit, not an exception: Celery logs and ignores exceptions from signal handlers.
        raise SystemExit("run the worker with --pool threads or --pool solo: the engine is one "
                         "thread per device and CUDA must not be initialised before a fork")
    runtime = rt.WorkerRuntime(settings, nodename=str(sender or "worker"))  # sender: the hostname
    runtime.start()
    rt.set_runtime(runtime)
    log.info("worker %s ready: %s", runtime.nodename, runtime.serving and runtime.serving.ref)


@worker_shutdown.connect
def _stop_runtime(**_: Any) -> None:
    # Celery's warm shutdown has already waited for the running tasks by now.
    runtime = rt._runtime
    if runtime is not None:
        runtime.stop()
        rt.set_runtime(None)
