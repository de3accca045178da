"""Redis key names shared by the API and the worker: the one place that spells them.

Pure functions of ids; it must not talk to Redis.
"""

from __future__ import annotations

PREFIX = "llm"
QUEUE = f"{PREFIX}:jobs"  # the Celery queue (a Redis list under kombu's Redis transport)
TASK_NAME = "llm.generate"
STATS = f"{PREFIX}:stats"  # counters and histogram buckets written when jobs finish
MODEL_CURRENT = f"{PREFIX}:model:current"  # what the workers serve (name, version, block size)
# The names of live workers (a sorted set, scored by their last beat): readers look up each
# one's heartbeat key instead of scanning a keyspace that holds every job of the last day.
WORKERS = f"{PREFIX}:workers"
# A stream naming each job that left `queued` (claimed by a worker, or cancelled), written by the
# scripts that make those transitions: the API's event hub reads it instead of the streams of
# queued jobs, which have nothing to say until then. Trimmed to about LEFT_QUEUE_MAXLEN entries.
LEFT_QUEUE = f"{PREFIX}:jobs:left-queue"
LEFT_QUEUE_MAXLEN = 10_000
# The jobs that are `queued` (a sorted set of ids, scored by their records' created_at): the
# create adds each, the claim and the cancel remove it as it leaves `queued`; its reader drops the
# oldest ids whose record is gone or not `queued` (expired unclaimed; claimed or cancelled by a pod
# older than the set), and the API adds at start-up those of queued jobs whose messages wait in
# QUEUE (created by an older API). QUEUE's length is no count of them: a job cancelled while
# queued keeps its message there until a worker pops it.
QUEUED = f"{PREFIX}:jobs:queued"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def events(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


def lease(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:lease"


def idempotency(key: str) -> str:
    return f"{PREFIX}:idem:{key}"


def worker(nodename: str) -> str:
    return f"{PREFIX}:workers:{nodename}"


def tokenizer(digest: str) -> str:
    return f"{PREFIX}:tokenizer:{digest}"
