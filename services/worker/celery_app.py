"""The worker's Celery app: shared config, the generate task, and the runtime's start and stop.

The model loads in `celeryd_after_setup`: after Celery has set up logging (in `worker_init`,
which comes first, every log line of the load was dropped) and before the consumer starts, so a
worker that cannot load takes no jobs. It loads in the worker's own process: run it with
`--pool threads` or `solo`, never prefork, so CUDA is never initialised before a fork.

A job it hands back (its engine stalled) goes where workers take the next message, not behind
the backlog (`HandBackRequest`).

It also makes kombu's Redis transport leave a lost connection's unacknowledged messages to the
visibility timeout (`leave_lost_channels_to_the_visibility_timeout`), so a Redis outage during
a job does not stop the worker.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject
from celery.signals import celeryd_after_setup, worker_shutdown
from celery.worker.request import Request
from kombu.message import Message

from services.common import keys
from services.common.celery_config import make_celery
from services.common.settings import Settings
from services.worker import runtime as rt
from services.worker.tasks import run_job

log = logging.getLogger(__name__)


def leave_lost_channels_to_the_visibility_timeout() -> bool:
    """Make kombu's Redis channels treat a connection they have lost as a connection error.

    When the consumer loses Redis, Celery 5.7 runs `connection.collect()`, which drops the
    transport's client (`transport.client = None`; the channel's close within it fails first,
    on the dead BRPOP socket), then `connection.close()`, which closes that channel again: its
    pools are gone, and restoring its unacked messages builds a new pool from
    `transport.client.hostname`, an AttributeError that Celery treats as unrecoverable, so the
    worker exits after its running jobs. A job that outlives the outage fails the same way when
    Celery acks it on that closed channel (`channel.connection` is None by then). With
    `acks_late` a running job is such a message: every worker running a job exited on a Redis
    outage of a second or more (celery 5.7.0 / kombu 5.7.0; Celery 5.6 and earlier never made
    that second close, and acked through the old pool).

    Nothing could reach Redis through such a channel, so: its restore is skipped (with a
    warning), and any other new client for it (the ack) raises redis's ConnectionError, which
    Celery logs and survives. The messages stay in Redis's unacked hash, where the
    visibility-timeout sweep (`restore_visible`, every `unacked_restore_interval`) delivers any
    still unacked again: a redelivered job that is final returns at once, a running one's lease
    keeps it from running twice. A channel whose connection is alive (a warm shutdown, a
    connection reset while Redis stays up) restores and acks as kombu does.

    Guarded by what it patches rather than a version number (it is harmless where kombu gets
    this right): it applies to a kombu whose Redis `QoS.restore_unacked(client=None)` and
    `Channel._connparams` read the transport's `client`, and returns whether it did (False,
    with a warning, if those internals have changed).
    """
    try:
        import redis.exceptions
        from kombu.transport import redis as kombu_redis
    except ImportError:  # pragma: no cover - celery[redis] installs both
        return False
    qos, channel = getattr(kombu_redis, "QoS", None), getattr(kombu_redis, "Channel", None)
    restore = getattr(qos, "restore_unacked", None)
    connparams = getattr(channel, "_connparams", None)
    if restore is None or connparams is None:
        log.warning("kombu's Redis transport changed: a lost broker connection is handled as "
                    "kombu does")  # fmt: skip
        return False
    if getattr(restore, "lost_channel_guard", False):
        return True

    def lost(chan: Any) -> bool:
        return getattr(getattr(chan, "connection", None), "client", None) is None

    @functools.wraps(restore)
    def restore_unacked(self: Any, client: Any = None) -> Any:
        if client is None and lost(self.channel):
            if self._delivered:
                log.warning(
                    "broker connection lost: %d unacknowledged message(s) stay in Redis and "
                    "are delivered again after the visibility timeout if still unacked",
                    len(self._delivered),
                )  # fmt: skip
            self._delivered.clear()
            return None
        return restore(self, client)

    @functools.wraps(connparams)
    def _connparams(self: Any, *args: Any, **kwargs: Any) -> Any:
        if lost(self):
            raise redis.exceptions.ConnectionError(
                "this broker channel's connection is closed (the worker reconnects on another)"
            )  # fmt: skip
        return connparams(self, *args, **kwargs)

    restore_unacked.lost_channel_guard = True  # type: ignore[attr-defined]
    qos.restore_unacked = restore_unacked  # type: ignore[union-attr]
    channel._connparams = _connparams  # type: ignore[union-attr]
    return True


def requeue_next(message: Message) -> bool:
    """Put a delivered message back where workers take the next one; False if Redis is away.

    kombu's Redis transport publishes with LPUSH and consumes with BRPOP; its requeue of a
    rejected message is an LPUSH too, behind every job queued since. `restore_by_tag(...,
    leftmost=False)` is the restore kombu runs for an expired or closed channel's message: in
    one transaction it takes the exact payload it stored from the `unacked` hash, drops it from
    the unacked index and RPUSHes it. Nothing is left for a later restore to push again.
    """
    try:
        message.channel.qos.restore_by_tag(message.delivery_tag, leftmost=False)
    except redis.RedisError as exc:
        log.warning("cannot hand message %s back to the front of the queue: %s",
                    message.delivery_tag, exc)  # fmt: skip
        return False
    return True


class HandBackRequest(Request):
    """The generate task's request: a requeue (`Reject(requeue=True)`) makes the job the next
    one any worker takes, since it is `running` already and its clients may hold part of its
    text."""

    def reject(self, requeue: bool = False) -> None:
        if requeue and not self.acknowledged and requeue_next(self.message):
            # Pushed and out of the unacked index in one transaction: a crash before this ack
            # leaves nothing to push twice, and the ack only ends this delivery.
            self.acknowledge()
            return
        # Redis away: kombu's requeue (its failure is logged), or the visibility timeout's.
        super().reject(requeue=requeue)


leave_lost_channels_to_the_visibility_timeout()
settings = Settings()
app = make_celery(settings, main="llm-worker")
app.conf.worker_pool = "threads"  # the default here; --pool solo works too, prefork never


@app.task(name=keys.TASK_NAME, bind=True, ignore_result=True, Request=HandBackRequest)
def generate(self: Task, job_id: str) -> str:
    """Run job `job_id` (its request is in the job record); returns the final status."""
    try:
        return run_job(rt.get_runtime(), job_id)
    except rt.EngineStalledError as exc:
        # Back to the front of the queue now (not left to the visibility timeout): this worker
        # is shutting down, and a healthy one takes the job next, once its lease expires.
        raise Reject(str(exc), requeue=True) from None


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
        if runtime.stalled.is_set():  # the broker connection is closed, the jobs handed back
            rt.exit_now()  # the interpreter's exit could wait on the stuck step forever
