"""Clients that leave, come back after the end, or are cut off by a shutdown, under a real API.

Real Redis and a real uvicorn process over HTTP; no worker is needed, so jobs stay queued until
they are cancelled (which also writes their stream's `done`).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from services.api.routers.jobs import WAIT_S
from services.common import keys, lua_scripts
from tests.helpers.services import (
    ApiProcess,
    api_without_workers,
    iter_sse,
    service_env,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with api_without_workers(tmp_path_factory.mktemp("api-clients"), appendonly=False) as stack:
        yield stack


def job_ids(admin: Any) -> set[str]:
    return {k.split(":")[2] for k in admin.scan_iter("llm:job:*", count=1000) if k.count(":") == 2}


def gauge(api: ApiProcess, name: str) -> float:
    text = httpx.get(f"{api.url}/metrics", timeout=10).text
    return float(re.search(rf"^{name} ([0-9.]+)$", text, re.M).group(1))


def test_a_seed_endpoint_caller_that_disconnects_cancels_its_job(stack: Any) -> None:
    # The caller learns the job's id only from the answer: once it is gone nobody can read the
    # result, so a job left queued would run for nobody (and a retry loop multiplies them).
    redis, api = stack
    admin = redis.client()
    before = job_ids(admin)
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    conn.request(
        "POST", "/generate_text", json.dumps({"prompt": "hello", "num_of_token_generated": 5}),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    (job_id,) = wait_until(lambda: job_ids(admin) - before, 15, 0.02, "the seed call's job")
    assert admin.hget(f"llm:job:{job_id}", "status") == "queued"  # the handler waits on it now

    conn.close()  # the caller gives up (its own timeout, Ctrl-C) without an answer

    wait_until(lambda: admin.hget(f"llm:job:{job_id}", "status") == "cancelled", 10, 0.05,
               "the abandoned job cancelled")  # fmt: skip
    record = httpx.get(f"{api.url}/jobs/{job_id}", timeout=10).json()
    assert record["attempts"] == 0 and record["result"]["completion_tokens"] == 0  # never ran
    # The handler stopped waiting too: it holds no subscription until LLM_SYNC_TIMEOUT_S.
    wait_until(lambda: gauge(api, "llm_sync_waits_open") == 0, 10, 0.05, "no wait held")


def seed_call_whose_job(
    stack: Any, end: Callable[[Any, str], None]
) -> tuple[httpx.Response, str]:
    """POST /generate_text; once its job is queued, end(admin, job_id) ends the job. The
    answer, and the job's id."""
    redis, api = stack
    admin = redis.client()
    before = job_ids(admin)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, f"{api.url}/generate_text", timeout=30,
                             json={"prompt": "hi", "num_of_token_generated": 3})  # fmt: skip
        (job_id,) = wait_until(lambda: job_ids(admin) - before, 15, 0.02, "the seed call's job")
        end(admin, job_id)
        return answer.result(timeout=30), job_id


def finished_by_a_worker(
    status: str, fields: dict[str, str], record_expired: bool = False
) -> Callable[[Any, str], None]:
    """What a worker does (CLAIM, then FINISH) to end a job; its record gone at once if
    record_expired, in the same transaction, as when its TTL runs out just then."""

    def end(admin: Any, job_id: str) -> None:
        claim = admin.register_script(lua_scripts.CLAIM)
        finish = admin.register_script(lua_scripts.FINISH)
        claim(**lua_scripts.claim_call(job_id, "w1", now=time.time(), lease_ttl_s=30, ttl_s=60))
        pipe = admin.pipeline(transaction=True)
        finish(keys=[keys.job(job_id), keys.events(job_id), keys.lease(job_id), keys.STATS],
               args=lua_scripts.finish_args("w1", status, 60, fields, {}, {}), client=pipe)
        if record_expired:
            pipe.delete(keys.job(job_id))
        pipe.execute()

    return end


def test_a_seed_call_whose_job_failed_is_502_naming_the_job(stack: Any) -> None:
    error = "the worker's engine stopped; submit it again"
    end = finished_by_a_worker("failed", {"error": error, "text": "", "completion_tokens": "0"})
    resp, job_id = seed_call_whose_job(stack, end)
    assert resp.status_code == 502, resp.text
    assert resp.json() == {"detail": error, "job_id": job_id}


def test_a_seed_call_whose_job_was_cancelled_is_409_not_the_bare_prompt(stack: Any) -> None:
    # Cancelled by someone else (or an operator) while the caller waits: it generated nothing.
    _, api = stack

    def cancel(admin: Any, job_id: str) -> None:
        assert httpx.post(f"{api.url}/jobs/{job_id}/cancel", timeout=10).status_code == 200

    resp, job_id = seed_call_whose_job(stack, cancel)
    assert resp.status_code == 409, resp.text
    assert resp.json() == {"detail": "job cancelled", "job_id": job_id}


def test_a_seed_call_whose_job_record_expired_as_it_ended_is_502(stack: Any) -> None:
    fields = {"text": "abc", "completion_tokens": "3"}
    resp, _ = seed_call_whose_job(stack, finished_by_a_worker("succeeded", fields, True))
    assert resp.status_code == 502, resp.text
    assert resp.json() == {"detail": "the job expired before it could be read"}


def read_events(api: ApiProcess, job_id: str, **headers: str) -> tuple[httpx.Response, list]:
    with httpx.stream("GET", f"{api.url}/jobs/{job_id}/events", headers=headers,
                      timeout=10) as resp:  # fmt: skip
        resp.read()
    return resp, list(iter_sse(resp.text.splitlines()))


def test_resuming_after_done_is_204_at_once(stack: Any) -> None:
    # A browser EventSource reconnects with Last-Event-ID whenever a response ends; 204 is the
    # one answer that makes it stop. An empty 200 after a quiet wait had it loop every few
    # seconds for as long as the job record lived.
    _, api = stack
    job_id = httpx.post(f"{api.url}/jobs", json={"prompt": "hello"}, timeout=10).json()["id"]
    assert httpx.post(f"{api.url}/jobs/{job_id}/cancel", timeout=10).json()["status"] == "cancelled"
    resp, events = read_events(api, job_id)
    assert resp.status_code == 200 and [e["event"] for e in events] == ["done"]
    done_id = events[-1]["id"]

    for _ in range(2):  # every reconnect, not just the first
        start = time.monotonic()
        resp, _ = read_events(api, job_id, **{"Last-Event-ID": done_id})
        assert resp.status_code == 204 and resp.content == b""
        assert time.monotonic() - start < WAIT_S  # no quiet wait first
    # The largest id a stream can hold: nothing follows it. Redis refuses a range that starts
    # past it, which once came back as a 503 telling the client to retry forever.
    resp, _ = read_events(api, job_id, **{"Last-Event-ID": f"{2**64 - 1}-{2**64 - 1}"})
    assert resp.status_code == 204
    # A client that has not seen the `done` yet still gets it.
    resp, events = read_events(api, job_id, **{"Last-Event-ID": "0-1"})
    assert resp.status_code == 200 and [e["id"] for e in events] == [done_id]


def test_metrics_count_the_event_streams_open_now(stack: Any) -> None:
    # (It used to hold a stream open by resuming after `done`, which now answers 204 at once.)
    _, api = stack
    assert gauge(api, "llm_event_streams_open") == 0
    job_id = httpx.post(f"{api.url}/jobs", json={"prompt": "hello"}, timeout=10).json()["id"]
    with httpx.stream("GET", f"{api.url}/jobs/{job_id}/events", timeout=10) as resp:
        assert resp.status_code == 200  # headers sent: the handler has subscribed
        wait_until(lambda: gauge(api, "llm_event_streams_open") == 1, 10, 0.02, "one stream")
        assert gauge(api, "llm_event_streams_parked") == 1  # its job is queued
    wait_until(lambda: gauge(api, "llm_event_streams_open") == 0, 10, 0.02, "no open stream")
    httpx.post(f"{api.url}/jobs/{job_id}/cancel", timeout=10)


def test_sigterm_ends_open_event_streams_cleanly(stack: Any, tmp_path: Any) -> None:
    # A rolling update SIGTERMs the API with streams open: each must end with its terminating
    # chunk, so the client sees the stream end and resumes with Last-Event-ID elsewhere. Cut
    # mid-chunk, httpx (scripts/demo.py's stream_job) raised, and uvicorn logged an ERROR per
    # stream.
    redis, _ = stack
    api = ApiProcess("api-stopping", service_env(redis.url, tmp_path / "no-model"), tmp_path)
    api.start()
    try:
        job_id = httpx.post(f"{api.url}/jobs", json={"prompt": "hi"}, timeout=10).json()["id"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            def stream() -> bytes:
                with httpx.stream("GET", f"{api.url}/jobs/{job_id}/events", timeout=30) as resp:
                    return resp.read()  # raises RemoteProtocolError if the stream is cut

            body = pool.submit(stream)
            wait_until(lambda: gauge(api, "llm_event_streams_open") == 1, 10, 0.02, "a stream")
            api.signal(signal.SIGTERM)
            assert b"event: done" not in body.result(timeout=20)  # ended, not finished
        api.wait(timeout_s=20)
    finally:
        api.stop()
    assert "ASGI callable returned without completing response" not in api.log_tail(100_000)
    httpx.post(f"{stack[1].url}/jobs/{job_id}/cancel", timeout=10)


def test_metrics_separate_sse_streams_from_seed_endpoint_waits(stack: Any) -> None:
    # A blocked /generate_text is no event stream: counted as one, a dashboard of SSE clients
    # showed streams while none was connected.
    redis, api = stack
    admin = redis.client()
    before = job_ids(admin)
    seed_call = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    seed_call.request(
        "POST", "/generate_text", json.dumps({"prompt": "hello", "num_of_token_generated": 5}),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        wait_until(lambda: gauge(api, "llm_sync_waits_open") == 1, 10, 0.02, "one seed wait")
        assert gauge(api, "llm_event_streams_open") == 0
        assert gauge(api, "llm_event_streams_parked") == 0  # nor a parked one (its job queued)
        job_id = httpx.post(f"{api.url}/jobs", json={"prompt": "hi"}, timeout=10).json()["id"]
        with httpx.stream("GET", f"{api.url}/jobs/{job_id}/events", timeout=10):
            wait_until(lambda: gauge(api, "llm_event_streams_open") == 1, 10, 0.02, "a stream")
            assert gauge(api, "llm_sync_waits_open") == 1
            assert gauge(api, "llm_event_streams_parked") == 1
        httpx.post(f"{api.url}/jobs/{job_id}/cancel", timeout=10)
    finally:
        seed_call.close()  # its job is cancelled (above)
    wait_until(lambda: gauge(api, "llm_sync_waits_open") == 0, 10, 0.02, "the wait ended")
    assert gauge(api, "llm_event_streams_open") == 0
    (seed_job,) = job_ids(admin) - before - {job_id}
    wait_until(lambda: admin.hget(f"llm:job:{seed_job}", "status") == "cancelled", 10, 0.05)
