"""The Celery configuration both sides share: JSON only, late acks, one prefetch, time limits.

Builds a Celery app object without tasks (the API only sends by name); it must not import the
worker's tasks or anything that touches torch.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from services.common import keys
from services.common.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a worker waits out a Redis outage
        "broker_connection_timeout": 2.0,
        "broker_transport_options": {
            # Unacked jobs come back after this; it must exceed the longest job (Settings checks).
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for expired unacked jobs every few seconds (kombu's default is ~100 s).
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 2)),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 2.0,
            "socket_timeout": 10.0,
        },
        # JSON only: a message can never carry a pickle.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Results live in the job record, not in a Celery result backend.
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.concurrency,
        # Enforced by the pool where it can (prefork); the task enforces them itself as well,
        # since the threads pool cannot interrupt a thread.
        "task_soft_time_limit": settings.job_time_limit_s,
        "task_time_limit": settings.job_time_limit_s + 30,
        "task_default_queue": keys.QUEUE,
        "task_routes": {keys.TASK_NAME: {"queue": keys.QUEUE}},
        # Fail fast when Redis is down so the API can answer 503 instead of hanging.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.1,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


def make_celery(settings: Settings, main: str = "llm") -> Celery:
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
