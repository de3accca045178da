"""A job a worker hands back (`Reject(requeue=True)`: its engine stalled) is the next one any
worker takes, ahead of the jobs queued since, and is never in the queue twice; with Redis away
it stays unacknowledged, for the visibility timeout to deliver again.

Real Redis, kombu's Redis transport with the services' options, and the generate task's Celery
request class (`HandBackRequest`) doing what the worker does with a Reject.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Consumer, Queue
from kombu.message import Message

from services.common import keys
from services.common.celery_config import make_celery
from services.common.settings import Settings
from services.worker.celery_app import HandBackRequest, generate
from tests.helpers.redis_server import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def app(redis_server: RedisServer) -> Iterator[Celery]:
    """The services' Celery app over the test's Redis."""
    app = make_celery(Settings(redis_url=redis_server.url))
    try:
        yield app
    finally:
        app.close()


@pytest.fixture
def redis(redis_server: RedisServer) -> Iterator[Any]:
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()


def send(app: Celery, *job_ids: str) -> None:
    for job_id in job_ids:
        app.send_task(keys.TASK_NAME, args=[job_id], task_id=job_id, queue=keys.QUEUE)


def take(conn: Connection, count: int) -> list[Message]:
    """`count` deliveries, one at a time as a one-slot worker takes them, none acked."""
    channel = conn.default_channel
    channel.basic_qos(0, count, False)
    taken: list[Message] = []
    with Consumer(channel, queues=[Queue(keys.QUEUE)], accept=["json"],
                  callbacks=[lambda _body, message: taken.append(message)]):  # fmt: skip
        while len(taken) < count:
            conn.drain_events(timeout=5)
    return taken


def hand_back(conn: Connection, message: Message) -> HandBackRequest:
    """What the worker does for a task that raised Reject(requeue=True)."""
    request = HandBackRequest(
        message, app=generate.app, task=generate, on_ack=message.ack_log_error,
        on_reject=message.reject_log_error, connection_errors=conn.connection_errors,
    )  # fmt: skip
    request.reject(requeue=True)
    return request


def test_a_handed_back_job_is_taken_before_the_jobs_queued_behind_it(
    app: Celery, redis: Any
) -> None:
    send(app, "handed-back")
    with app.connection_for_read() as conn:
        [running] = take(conn, 1)
        send(app, "behind-0", "behind-1", "behind-2")
        assert hand_back(conn, running).acknowledged
        # Closing the channel (the worker's warm shutdown) restores nothing a second time.
    assert redis.llen(keys.QUEUE) == 4 and not redis.hlen("unacked")
    with app.connection_for_read() as conn:
        order = [m.headers["id"] for m in take(conn, 4)]
    # Before: ['behind-0', 'behind-1', 'behind-2', 'handed-back']
    assert order == ["handed-back", "behind-0", "behind-1", "behind-2"]


def test_a_job_handed_back_while_redis_is_down_stays_for_the_visibility_timeout(
    redis_server: RedisServer, app: Celery, redis: Any
) -> None:
    send(app, "handed-back")
    with app.connection_for_read() as conn:
        [running] = take(conn, 1)
        redis_server.stop()
        hand_back(conn, running)  # logged, not raised: the worker goes on exiting
        redis_server.start()
        stored = json.loads(redis.hget("unacked", running.delivery_tag))
        assert stored[0]["headers"]["id"] == "handed-back"  # the sweep restores it from here
        assert redis.zscore("unacked_index", running.delivery_tag) is not None
        assert not redis.llen(keys.QUEUE)
    # Or the channel's close does, Redis being back: either way there is one copy.
    assert redis.llen(keys.QUEUE) + redis.hlen("unacked") == 1
