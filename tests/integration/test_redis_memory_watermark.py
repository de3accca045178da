"""Redis near and at its maxmemory (noeviction, as the chart runs it): the workers keep working.

At the cap Redis refuses every client's writes. The API stops taking jobs at a watermark below it
(LLM_REDIS_MEMORY_WATERMARK), so a worker can still take, run and record the queued ones; and the
worker's liveness probe does not restart it for a Redis that refuses its heartbeat.

Real Redis, a real uvicorn API and a real Celery worker; real HTTP.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from services.common import keys
from services.common.redis_memory import MemoryUse
from tests.helpers.redis_memory import redis_at
from tests.helpers.redis_server import RedisServer
from tests.helpers.services import (
    REPO,
    ApiProcess,
    WorkerProcess,
    make_model_dir,
    service_env,
    wait_until,
)

pytestmark = pytest.mark.integration

PROMPT = "First Citizen: " * 250  # ~4 KB: each job's record takes a few KB of Redis
MOST_JOBS = 5_000  # a bound on the loop: the API must refuse one long before


def probe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m services.worker.healthcheck` (the chart's probes) with this environment."""
    return subprocess.run(
        [sys.executable, "-m", "services.worker.healthcheck", *args], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def submit_until_refused(client: httpx.Client) -> tuple[list[str], httpx.Response]:
    """Jobs as a busy client sends them, until the API refuses one: (queued ids, refusal)."""
    queued = []
    for _ in range(MOST_JOBS):
        resp = client.post("/jobs", json={
            "prompt": PROMPT, "max_new_tokens": 1, "truncate": "left", "eos": False,
        })  # fmt: skip
        if resp.status_code != 202:
            return queued, resp
        queued.append(resp.json()["id"])
    raise AssertionError(f"{MOST_JOBS} jobs taken: the API never refused one")


def test_jobs_queued_until_the_api_refuses_for_memory_are_all_taken_and_finished(
    tmp_path: Path,
) -> None:
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    env = service_env(redis_server.url, make_model_dir(tmp_path / "model"))
    worker = WorkerProcess("worker", env, tmp_path / "logs", concurrency=4)
    api = ApiProcess("api", env, tmp_path / "logs")
    admin = redis_server.client()
    client = httpx.Client(base_url=api.url, timeout=30)
    try:
        worker.start(redis_server.url)
        api.start()
        first = client.post("/jobs", json={"prompt": "hello", "max_new_tokens": 1}).json()["id"]
        wait_until(lambda: admin.hget(keys.job(first), "status") == "succeeded", 60,
                   message="a first job (the worker is connected and serving)")  # fmt: skip
        worker.signal(signal.SIGSTOP)  # busy elsewhere: the jobs wait in the queue
        with redis_at(admin, 0.895, filler_bytes=64 << 20):  # just under the 0.9 watermark
            queued, refused = submit_until_refused(client)
            worker.signal(signal.SIGCONT)

            def statuses() -> Counter[str | None]:
                with admin.pipeline(transaction=False) as pipe:
                    for job_id in queued:
                        pipe.hget(keys.job(job_id), "status")
                    return Counter(pipe.execute())

            try:
                wait_until(lambda: set(statuses()) == {"succeeded"}, 180, 0.5)
            except TimeoutError:
                # Before: Redis refused the worker's unacked record of each popped message,
                # so those jobs stayed `queued` with their messages in neither structure.
                raise AssertionError(
                    f"of {len(queued)} queued jobs: {dict(statuses())}; queue "
                    f"{admin.llen(keys.QUEUE)} messages, unacked {admin.hlen('unacked')}"
                ) from None
            assert admin.llen(keys.QUEUE) == 0 and admin.hlen("unacked") == 0
            wait_until(lambda: admin.exists(keys.worker(worker.nodename)), 30,
                       message="the worker's heartbeat")  # it writes it, under the cap
            assert not MemoryUse.from_info(admin.info("memory")).over(1.0)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
        assert "LLM_REDIS_MEMORY_WATERMARK" in refused.json()["detail"]
        assert queued  # the watermark was not reached before the first of them
    finally:
        worker.signal(signal.SIGCONT)
        api.stop()
        worker.stop()
        redis_server.stop()


def test_liveness_passes_while_redis_refuses_the_heartbeat_at_its_cap_and_readiness_fails(
    tmp_path: Path,
) -> None:
    # No worker beats here, as when Redis refused the worker's heartbeat until its key expired.
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    env = service_env(redis_server.url, tmp_path / "no-model")
    admin = redis_server.client()
    try:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")  # over it: every write is refused
        try:
            live, ready = probe(env, "--live"), probe(env)
        finally:
            admin.config_set("maxmemory", "0")
        # With room, a missing heartbeat is the worker's own fault: liveness still fails.
        live_with_room = probe(env, "--live")
    finally:
        redis_server.stop()
    assert live.returncode == 0, live.stderr  # before: 1, and every worker was restarted
    assert "alive" in live.stderr and "maxmemory" in live.stderr
    assert ready.returncode == 1 and "maxmemory" in ready.stderr
    assert live_with_room.returncode == 1, live_with_room.stderr
    assert "no fresh worker heartbeat" in live_with_room.stderr
