"""The API's own log lines under uvicorn, as the image and the chart start it: each carries time,
level and logger; a created job is named, an idempotent repeat too; LLM_LOG_LEVEL filters.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.helpers.redis_server import RedisServer
from tests.helpers.services import ApiProcess, api_without_workers, service_env, wait_until

pytestmark = pytest.mark.integration

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


def log_line(api: ApiProcess, pattern: str) -> str | None:
    found = re.search(pattern, api.log_path.read_text(errors="replace"), re.M)
    return found.group(0) if found else None


def test_api_logs_each_job_it_creates_and_redis_errors_with_time_level_and_logger(
    tmp_path: Path,
) -> None:
    # On-call follows a client's POST into the worker log by its job id; the API never logged
    # the id, and its warnings came out bare (no level, no time) through the last-resort handler.
    with api_without_workers(tmp_path, appendonly=False) as (redis, api):
        body = {"prompt": "All:", "max_new_tokens": 4}
        created = httpx.post(f"{api.url}/jobs", json=body, timeout=10)
        assert created.status_code == 202
        job_id = created.json()["id"]
        queued = rf"^{STAMP} INFO services\.api\.submit: job {job_id} queued \(.*\)$"
        wait_until(lambda: log_line(api, queued), 10, 0.05, "the job's queued line")

        headers = {"Idempotency-Key": "retry-1"}
        first = httpx.post(f"{api.url}/jobs", json=body, headers=headers, timeout=10).json()["id"]
        again = httpx.post(f"{api.url}/jobs", json=body, headers=headers, timeout=10)
        assert again.status_code == 202 and again.json()["id"] == first
        repeat = rf"^{STAMP} INFO services\.api\.submit: job {first} returned again for a repeated"
        wait_until(lambda: log_line(api, repeat), 10, 0.05, "the idempotent hit's line")
        assert len(re.findall(rf"job {first} queued", api.log_path.read_text())) == 1

        redis.stop()
        assert httpx.post(f"{api.url}/jobs", json=body, timeout=10).status_code == 503
        outage = rf"^{STAMP} WARNING services\.api\.errors: POST /jobs: Redis unavailable"
        wait_until(lambda: log_line(api, outage), 10, 0.05, "the Redis warning with its level")


def test_llm_log_level_warning_leaves_out_the_job_lines(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", appendonly=False)
    redis.start()
    env = service_env(redis.url, tmp_path / "no-model", LLM_LOG_LEVEL="warning")
    api = ApiProcess("api", env, tmp_path / "logs")
    try:
        api.start()
        created = httpx.post(f"{api.url}/jobs", json={"prompt": "All:"}, timeout=10)
        assert created.status_code == 202
        redis.stop()
        assert httpx.post(f"{api.url}/jobs", json={"prompt": "All:"}, timeout=10).status_code == 503
        wait_until(lambda: log_line(api, r" WARNING services\.api\.errors: "), 10, 0.05, "warning")
        assert created.json()["id"] not in api.log_path.read_text()
    finally:
        api.stop()
        redis.stop()
