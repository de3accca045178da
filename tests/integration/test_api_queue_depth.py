"""`llm_queue_depth` under a real API and Redis with no worker: it counts the jobs still queued,
not the Celery messages (a job cancelled while queued keeps its message until a worker pops it),
also across an upgrade from pods that did not keep that count.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from services.api.queue import task_message
from services.common import keys
from services.common.celery_config import make_celery
from services.common.jobs import JobRecord, JobRequest
from services.common.settings import Settings
from tests.helpers.services import api_without_workers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with api_without_workers(tmp_path_factory.mktemp("api-depth"), appendonly=False) as stack:
        yield stack


def queue_depth(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^llm_queue_depth (\S+)$", text, re.M).group(1))


def test_jobs_cancelled_while_queued_leave_the_queue_depth(stack: Any) -> None:
    redis, api = stack
    jobs = [httpx.post(f"{api.url}/jobs", json={"max_new_tokens": 4}, timeout=10).json()["id"]
            for _ in range(3)]  # fmt: skip
    assert queue_depth(api.url) == 3
    for job_id in jobs[:2]:
        assert httpx.post(f"{api.url}/jobs/{job_id}/cancel", timeout=10).status_code == 200
    assert queue_depth(api.url) == 1
    assert redis.client().llen("llm:jobs") == 3  # their messages wait for a worker to drop them


def test_a_job_claimed_by_an_older_worker_leaves_the_queue_depth(stack: Any) -> None:
    redis, api = stack
    job_id = httpx.post(f"{api.url}/jobs", json={"max_new_tokens": 4}, timeout=10).json()["id"]
    before = queue_depth(api.url)
    # What a worker older than the count writes as it claims (it does not remove the job).
    redis.client().hset(keys.job(job_id), mapping={"status": "running", "attempts": "1"})
    assert queue_depth(api.url) == before - 1  # before: counted until the job TTL, a day


def test_jobs_queued_by_an_older_api_are_counted_once_the_api_starts(stack: Any) -> None:
    redis, api = stack
    client, celery = redis.client(), make_celery(Settings(redis_url=redis.url))
    before = queue_depth(api.url)
    for i in range(3):  # what an API older than the count writes: a record and a message
        job_id = f"queued-by-an-older-api-{i}"
        record = JobRecord.new(job_id, JobRequest(prompt="a", max_new_tokens=4))
        client.hset(keys.job(job_id), mapping=record.to_hash())
        client.lpush(keys.QUEUE, task_message(celery, job_id))
    assert queue_depth(api.url) == before
    api.stop()  # the upgrade's new API
    api.start()
    assert queue_depth(api.url) == before + 3  # before: not counted until claimed
