"""`llm_queue_depth` under a real API and Redis with no worker: it counts the jobs still queued,
not the Celery messages (a job cancelled while queued keeps its message until a worker pops it).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

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
