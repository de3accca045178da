"""Redis going away and coming back under a running API: 503 + Retry-After, then recovery.

Real Redis (AOF) and a real uvicorn process; no worker is needed, so jobs simply stay queued.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from services.api.memory import MAX_AGE_S
from services.common.redis_memory import MemoryUse
from tests.helpers.redis_memory import redis_at
from tests.helpers.services import api_without_workers, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with api_without_workers(tmp_path_factory.mktemp("api-outage")) as stack:
        yield stack


def test_redis_down_is_503_with_retry_after_and_the_api_recovers_by_itself(stack: Any) -> None:
    redis, api = stack
    client = httpx.Client(base_url=api.url, timeout=10)
    before = client.post("/jobs", json={"prompt": "hello"})
    assert before.status_code == 202
    job_id = before.json()["id"]
    assert client.get("/readyz").status_code == 503  # Redis is up but no worker beats

    redis.stop()
    down = [
        client.post("/jobs", json={"prompt": "hello"}),
        client.get(f"/jobs/{job_id}"),
        client.post(f"/jobs/{job_id}/cancel"),
        client.get(f"/jobs/{job_id}/events"),
        client.get("/readyz"),
    ]
    alive = client.get("/healthz")
    metrics = client.get("/metrics")

    for resp in down:
        assert resp.status_code == 503, (resp.request.url, resp.text)
        assert int(resp.headers["Retry-After"]) > 0
    assert alive.status_code == 200
    assert metrics.status_code == 200 and "llm_redis_up 0.0" in metrics.text

    redis.start()  # same port, same AOF: the earlier job is still there
    pid = api.proc.pid if api.proc else None
    after = client.post("/jobs", json={"prompt": "hello again"})
    assert after.status_code == 202
    assert client.get(f"/jobs/{job_id}").json()["status"] == "queued"
    assert api.alive and api.proc is not None and api.proc.pid == pid  # never restarted


def test_a_redis_that_refuses_writes_is_503_with_retry_after_not_a_500(stack: Any) -> None:
    # Out of memory under noeviction (or a replica that turned read-only in a failover): Redis
    # answers with an error instead of dropping the connection, and it passes the same way.
    redis, api = stack
    client = httpx.Client(base_url=api.url, timeout=10)
    admin = redis.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")
    try:
        full = client.post("/jobs", json={"prompt": "hello"})
    finally:
        admin.config_set("maxmemory", "0")
    assert full.status_code == 503, full.text
    assert int(full.headers["Retry-After"]) > 0
    # Taken again once the API's view of Redis's memory is renewed (at most a second old).
    wait_until(lambda: client.post("/jobs", json={"prompt": "hello"}).status_code == 202, 10,
               0.2, "a job taken after the cap was lifted")  # fmt: skip


def test_a_job_past_the_memory_watermark_is_503_naming_it_while_redis_still_takes_writes(
    stack: Any,
) -> None:
    # At Redis's own cap it refuses every client's writes, the workers' too (a queued job's
    # message popped and then lost, heartbeats, results): the API stops taking jobs before it.
    redis, api = stack
    client = httpx.Client(base_url=api.url, timeout=10)
    admin = redis.client()
    body = {"prompt": "hello"}
    earlier = client.post("/jobs", json=body, headers={"Idempotency-Key": "before-the-mark"})
    assert earlier.status_code == 202
    with redis_at(admin, 0.95) as hold:  # over the 0.9 default, under the cap

        def submitted_past_the_watermark() -> httpx.Response | None:
            hold()  # at 0.95 of the cap whatever Redis's memory did since
            resp = client.post("/jobs", json=body)
            return resp if resp.status_code == 503 else None

        refused = wait_until(submitted_past_the_watermark, 10, 0.2,
                             "a 503 past the watermark (before: 202 until Redis itself refused "
                             "the write)")  # fmt: skip
        again = client.post("/jobs", json=body, headers={"Idempotency-Key": "before-the-mark"})
        admin.set("still-writable", "1")  # Redis itself is under its cap: workers can write
        assert not MemoryUse.from_info(admin.info("memory")).over(1.0)
    assert int(refused.headers["Retry-After"]) > 0
    detail = refused.json()["detail"]
    assert "nearly full" in detail and "LLM_REDIS_MEMORY_WATERMARK" in detail, detail
    # A client retrying a job it did submit still learns its id: that is a read.
    assert again.status_code == 202 and again.json()["id"] == earlier.json()["id"]
    wait_until(lambda: client.post("/jobs", json=body).status_code == 202, 10, 0.2,
               "a job taken once Redis's memory is under the watermark again")  # fmt: skip


def test_the_watermark_costs_no_redis_round_trip_per_submission(stack: Any) -> None:
    redis, api = stack
    client = httpx.Client(base_url=api.url, timeout=10)
    admin = redis.client()
    admin.config_resetstat()
    start = time.monotonic()
    for _ in range(50):
        assert client.post("/jobs", json={"prompt": "hello"}).status_code == 202
    took_s = time.monotonic() - start
    info_calls = admin.info("commandstats").get("cmdstat_info", {}).get("calls", 0)
    assert info_calls <= took_s + 2, (info_calls, took_s)  # one INFO a second, not 50


def test_redis_lost_while_a_seed_endpoint_waits_is_503_naming_the_queued_job(stack: Any) -> None:
    # The job is saved before the wait; a bare "retry shortly" would have the client submit it
    # again (the seed endpoints take no Idempotency-Key), and both would run.
    redis, api = stack
    admin = redis.client()
    before = set(admin.scan_iter("llm:job:*"))
    answer: dict[str, httpx.Response] = {}

    def call() -> None:
        with httpx.Client(base_url=api.url, timeout=30) as client:
            answer["resp"] = client.post(
                "/generate_text", json={"prompt": "hello", "num_of_token_generated": 2}
            )

    waiter = threading.Thread(target=call)
    waiter.start()
    deadline = time.monotonic() + 15
    while not set(admin.scan_iter("llm:job:*")) - before:  # the job is queued: it now waits
        assert time.monotonic() < deadline, "the seed endpoint never queued its job"
        time.sleep(0.02)
    redis.stop()
    try:
        waiter.join(timeout=30)
        resp = answer["resp"]
    finally:
        redis.start()
    assert resp.status_code == 503, resp.text
    assert int(resp.headers["Retry-After"]) > 0
    body = resp.json()
    record = httpx.get(f"{api.url}{body['links']['self']}", timeout=10)
    assert record.status_code == 200 and record.json()["id"] == body["job_id"]
    assert record.json()["status"] == "queued"  # it will still run: poll, do not resubmit


ANSWER_WITHIN_S = 6.0  # a few seconds: a scrape (10 s) or an ingress (60 s) still gets it


def timed(client: httpx.Client, method: str, path: str, **kwargs: Any) -> tuple[float, Any]:
    start = time.monotonic()
    resp = client.request(method, path, **kwargs)
    return time.monotonic() - start, resp


def test_concurrent_submissions_all_answer_within_seconds_when_redis_hangs(stack: Any) -> None:
    # Each waited behind the one before it for the memory watermark's INFO (2 s apiece): the
    # tenth of ten concurrent submissions was answered after 20 s.
    redis, api = stack
    assert redis._proc is not None
    with httpx.Client(base_url=api.url, timeout=6 * ANSWER_WITHIN_S) as client:
        assert client.post("/jobs", json={"prompt": "hello"}).status_code == 202  # reads cached
    time.sleep(MAX_AGE_S + 0.5)  # the watermark's reading is stale: the next submit reads INFO
    os.kill(redis._proc.pid, signal.SIGSTOP)
    try:
        with httpx.Client(base_url=api.url, timeout=6 * ANSWER_WITHIN_S) as client, \
                ThreadPoolExecutor(8) as pool:  # fmt: skip
            answers = list(pool.map(lambda _: timed(client, "POST", "/jobs",
                                                    json={"prompt": "hello"}), range(8)))
    finally:
        os.kill(redis._proc.pid, signal.SIGCONT)
    assert [resp.status_code for _, resp in answers] == [503] * 8
    assert max(took_s for took_s, _ in answers) < ANSWER_WITHIN_S, answers
    with httpx.Client(base_url=api.url, timeout=6 * ANSWER_WITHIN_S) as client:
        wait_until(lambda: client.post("/jobs", json={"prompt": "hello"}).status_code == 202,
                   10, 0.2, "jobs taken again once Redis answers (the failure is kept ~1 s)")


def test_metrics_and_job_endpoints_answer_within_seconds_when_redis_hangs(stack: Any) -> None:
    # SIGSTOP: Redis keeps its sockets open and the kernel still accepts connections into its
    # backlog, but nothing answers: a paused server or a network partition, no RST to notice.
    # Each endpoint used to wait 30-91 s (10 s reads, each retry reconnecting and waiting again).
    redis, api = stack
    client = httpx.Client(base_url=api.url, timeout=3 * ANSWER_WITHIN_S)
    job_id = client.post("/jobs", json={"prompt": "hello"}).json()["id"]
    assert "llm_redis_up 1.0" in client.get("/metrics").text
    assert redis._proc is not None
    os.kill(redis._proc.pid, signal.SIGSTOP)
    try:
        answers = {
            "/metrics": timed(client, "GET", "/metrics"),
            "/readyz": timed(client, "GET", "/readyz"),
            "POST /jobs": timed(client, "POST", "/jobs", json={"prompt": "hello"}),
            "GET /jobs/{id}": timed(client, "GET", f"/jobs/{job_id}"),
            "/healthz": timed(client, "GET", "/healthz"),
        }
    finally:
        os.kill(redis._proc.pid, signal.SIGCONT)

    for name, (took_s, resp) in answers.items():
        assert took_s < ANSWER_WITHIN_S, (name, took_s)
    took, metrics = answers["/metrics"]
    assert metrics.status_code == 200 and "llm_redis_up 0.0" in metrics.text
    assert "llm_http_requests_total" in metrics.text  # the in-process metrics are still scraped
    for name in ("/readyz", "POST /jobs", "GET /jobs/{id}"):
        resp = answers[name][1]
        assert resp.status_code == 503, (name, resp.text)
        assert int(resp.headers["Retry-After"]) > 0
    assert answers["/readyz"][1].json()["redis"] is False
    assert answers["/healthz"][1].status_code == 200

    # Resumed: every endpoint works again at once, through the same API process.
    assert "llm_redis_up 1.0" in client.get("/metrics").text
    assert client.get(f"/jobs/{job_id}").json()["status"] == "queued"
    assert client.post("/jobs", json={"prompt": "hello again"}).status_code == 202
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["redis"] is True  # no worker here, as before
