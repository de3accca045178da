"""Hands a job to the workers: the Celery task message, built here and pushed by `redis.asyncio`.

Celery's own publisher is blocking (a thread per send, ~10x slower in a burst), so the API builds
the message with Celery (`app.amqp.as_task_v2`, JSON only) and wraps it the way kombu's Redis
transport does; the store pushes it in the same transaction that creates the job record.
"""

from __future__ import annotations

import base64
import json
import socket
import uuid

from celery import Celery
from kombu.serialization import dumps

from services.common import keys

ORIGIN = f"llm-api@{socket.gethostname()}"


def task_message(celery: Celery, job_id: str) -> str:
    """What `celery.send_task(TASK_NAME, args=[job_id], task_id=job_id)` LPUSHes on Redis."""
    msg = celery.amqp.as_task_v2(
        job_id, keys.TASK_NAME, args=[job_id], kwargs={}, origin=ORIGIN, ignore_result=True
    )
    content_type, encoding, body = dumps(msg.body, serializer="json")
    raw = body.encode(encoding) if isinstance(body, str) else body
    envelope = {
        # kombu's virtual transport envelope (prepare_message + _inplace_augment_message).
        "body": base64.b64encode(raw).decode("ascii"),
        "content-encoding": encoding,
        "content-type": content_type,
        "headers": msg.headers,
        "properties": {
            **msg.properties,
            "delivery_mode": 2,  # persistent
            "delivery_info": {"exchange": "", "routing_key": keys.QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope)
