"""Workers and Redis failing under load: SIGKILL mid-job, SIGTERM, Redis restarted from its AOF.

Real Redis (appendfsync always), two real Celery worker processes with a short visibility
timeout so an abandoned job is redelivered within seconds, and the API over HTTP. The tests
run in order and use up the workers: SIGKILL leaves one, SIGTERM (last) stops it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from services.common import keys
from services.worker.token_sink import streamed, streamed_text
from tests.helpers.redis_server import RedisServer
from tests.helpers.services import (
    REPO,
    ApiProcess,
    WorkerProcess,
    make_model_dir,
    read_sse,
    service_env,
    start_all,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FINAL = {"succeeded", "failed", "cancelled"}
LONG = {"prompt": "First Citizen:", "max_new_tokens": 300, "eos": False}  # ~2 s here


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("worker-recovery")
    redis = RedisServer(root / "redis", appendfsync="always")
    redis.start()
    model_dir = make_model_dir(root / "model", block_size=1024)
    env = service_env(
        redis.url, model_dir, LLM_MAX_NEW_TOKENS=1000, LLM_MAX_BATCH=4,
        LLM_VISIBILITY_TIMEOUT_S=9, LLM_JOB_TIME_LIMIT_S=8, LLM_LEASE_TTL_S=2,
    )  # fmt: skip
    workers = {
        name: WorkerProcess(name, env, root / "logs", concurrency=4) for name in ("w1", "w2")
    }
    api = ApiProcess("api", env, root / "logs")
    try:
        api.spawn()
        start_all(list(workers.values()), redis.url)
        api.wait_ready()
        yield {"redis": redis, "workers": workers, "api": api, "model_dir": model_dir}
    finally:
        api.stop()
        for worker in workers.values():
            worker.stop()
        redis.stop()


@pytest.fixture(scope="module")
def client(stack: Any) -> Any:
    with httpx.Client(base_url=stack["api"].url, timeout=30) as c:
        yield c


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    resp = client.post("/jobs", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    return client.get(f"/jobs/{job_id}").json()


def wait_final(client: httpx.Client, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    return wait_until(lambda: (j := job(client, job_id))["status"] in FINAL and j, timeout_s,
                      0.1, f"job {job_id} final")  # fmt: skip


def running_on(stack: Any, client: httpx.Client, job_id: str) -> WorkerProcess:
    """The worker process running job_id, once it has streamed a token."""
    redis = stack["redis"].client()
    wait_until(lambda: redis.xlen(keys.events(job_id)) > 0, 30, message="first token")
    owner = redis.hget(keys.job(job_id), "worker") or ""
    return next(w for w in stack["workers"].values() if owner.startswith(w.nodename + ":"))


def healthcheck(worker: WorkerProcess) -> int:
    """`python -m services.worker.healthcheck` with the worker's environment: its exit code."""
    return subprocess.run(
        [sys.executable, "-m", "services.worker.healthcheck"], env=worker.env, cwd=REPO,
        capture_output=True, timeout=60,
    ).returncode  # fmt: skip


def done_events(stack: Any, job_id: str) -> int:
    entries = stack["redis"].client().xrange(keys.events(job_id))
    return sum(1 for _, fields in entries if fields["type"] == "done")


def expected_text(stack: Any, body: dict[str, Any]) -> str:
    from lmcore.checkpoint import load_model_dir
    from lmcore.generate import SamplingParams, generate

    loaded = load_model_dir(stack["model_dir"])
    params = SamplingParams(**{k: v for k, v in body.items() if k != "prompt"})
    return generate(loaded.model, loaded.tokenizer, [body["prompt"]], params)[0].text


def test_job_on_a_sigkilled_worker_is_redelivered_and_succeeds_exactly_once(
    stack: Any, client: Any
) -> None:
    body = {**LONG, "seed": 11}
    job_id = submit(client, body)
    victim = running_on(stack, client, job_id)

    victim.kill()  # SIGKILL: no ack, no cleanup; the message stays unacked in Redis
    final = wait_final(client, job_id, timeout_s=60)

    assert final["status"] == "succeeded", final
    assert final["attempts"] == 2
    assert final["result"]["completion_tokens"] == 300
    assert final["result"]["text"] == expected_text(stack, body)
    assert done_events(stack, job_id) == 1  # one result, one final event
    with client.stream("GET", f"/jobs/{job_id}/events") as resp:
        events = read_sse(resp)
    held = streamed_text([(e["id"], {"type": e["event"], **e["data"]}) for e in events[:-1]])
    assert held == final["result"]["text"]  # the stream a client read adds up to the result


def test_a_redelivered_message_for_a_final_job_returns_at_once(stack: Any, client: Any) -> None:
    job_id = submit(client, {"prompt": "All:", "max_new_tokens": 8})
    first = wait_final(client, job_id)
    from services.common.celery_config import make_celery
    from services.common.settings import Settings

    celery = make_celery(Settings(redis_url=stack["redis"].url))
    celery.send_task(keys.TASK_NAME, args=[job_id], task_id=job_id, queue=keys.QUEUE)
    redis = stack["redis"].client()
    wait_until(lambda: redis.llen(keys.QUEUE) == 0 and not redis.hlen("unacked"), 30,
               message="duplicate consumed")  # fmt: skip

    assert job(client, job_id) == first  # same attempts, text and timings
    assert done_events(stack, job_id) == 1
    celery.close()


def test_a_redelivered_job_ending_shorter_than_its_stream_resets_clients_to_its_result(
    stack: Any, client: Any
) -> None:
    """A first attempt streamed more than the second makes (here: the same seed, fewer tokens,
    as a hot-swapped model's earlier eos would): at `done` clients hold the result's text."""
    from services.common.celery_config import make_celery
    from services.common.jobs import JobRecord, JobRequest
    from services.common.settings import Settings

    body = {"prompt": "First Citizen:", "max_new_tokens": 40, "seed": 21, "eos": False}
    longer = expected_text(stack, {**body, "max_new_tokens": 120})
    redis = stack["redis"].client()
    job_id = "redelivered-shorter"
    record = JobRecord.new(job_id, JobRequest(**body)).to_hash()
    record.update(status="running", attempts="1", worker="gone@host:0")  # its worker died
    redis.hset(keys.job(job_id), mapping=record)
    for i in range(0, len(longer), 16):  # what that worker streamed before it died
        redis.xadd(keys.events(job_id), {"type": "token", "text": longer[i:i + 16], "tokens": "4"})
    celery = make_celery(Settings(redis_url=stack["redis"].url))
    celery.send_task(keys.TASK_NAME, args=[job_id], task_id=job_id, queue=keys.QUEUE)
    final = wait_final(client, job_id)
    celery.close()

    assert final["status"] == "succeeded" and final["attempts"] == 2
    result = final["result"]
    assert result["text"] == expected_text(stack, body)
    assert longer.startswith(result["text"]) and len(result["text"]) < len(longer)
    with client.stream("GET", f"/jobs/{job_id}/events") as resp:
        events = read_sse(resp)
    assert events[-2]["event"] == "reset"
    held = streamed([(e["id"], {"type": e["event"], **{k: str(v) for k, v in e["data"].items()}})
                     for e in events[:-1]])  # fmt: skip
    assert held == (result["text"], result["completion_tokens"])


def test_a_redelivered_job_cancelled_before_it_restarts_records_what_clients_hold(
    stack: Any, client: Any
) -> None:
    from services.common.celery_config import make_celery
    from services.common.jobs import JobRecord, JobRequest
    from services.common.settings import Settings

    redis = stack["redis"].client()
    job_id = "redelivered-cancelled"
    record = JobRecord.new(job_id, JobRequest(prompt="All:", max_new_tokens=40)).to_hash()
    record.update(status="running", attempts="1", worker="gone@host:0", cancel_requested="1")
    redis.hset(keys.job(job_id), mapping=record)
    for text in (" there,", " you"):  # what the dead worker streamed: 3 tokens
        redis.xadd(keys.events(job_id), {"type": "token", "text": text,
                                         "tokens": "2" if text == " there," else "1"})
    celery = make_celery(Settings(redis_url=stack["redis"].url))
    celery.send_task(keys.TASK_NAME, args=[job_id], task_id=job_id, queue=keys.QUEUE)
    final = wait_final(client, job_id)
    celery.close()

    assert final["status"] == "cancelled" and final["attempts"] == 2
    held = streamed(redis.xrange(keys.events(job_id)))
    assert held == (" there, you", 3)
    assert (final["result"]["text"], final["result"]["completion_tokens"]) == held


def test_jobs_queued_across_a_redis_restart_all_complete(stack: Any, client: Any) -> None:
    bodies = [{"prompt": f"Citizen {i}:", "max_new_tokens": 100, "seed": i, "eos": False}
              for i in range(16)]  # fmt: skip
    ids = [submit(client, b) for b in bodies]
    assert stack["redis"].client().llen(keys.QUEUE) > 0  # some are still waiting in the queue

    stack["redis"].restart(hard=True)  # SIGKILL, then start again from the AOF
    finals = [wait_final(client, j, timeout_s=90) for j in ids]

    assert [f["status"] for f in finals] == ["succeeded"] * len(ids)
    assert all(f["result"]["completion_tokens"] == 100 for f in finals)
    assert all(done_events(stack, j) == 1 for j in ids)


def test_a_worker_running_a_job_survives_redis_down_for_seconds(tmp_path: Any) -> None:
    """Redis stopped mid-job for longer than redis-py's retries (~1 s), then started again on
    its port: the worker reconnects (Celery 5.7 with kombu 5.7 exited: restoring or acking a
    lost channel's message raised AttributeError), the job ends once with its whole text, its
    message does not stay unacked (redelivered after the short visibility timeout, it finds the
    job final), and a job sent afterwards runs. Own Redis and worker: the stack's are shared."""
    from services.common.celery_config import make_celery
    from services.common.jobs import JobRecord, JobRequest
    from services.common.settings import Settings

    redis_server = RedisServer(tmp_path / "redis", appendfsync="always")
    redis_server.start()
    env = service_env(
        redis_server.url, make_model_dir(tmp_path / "model", block_size=1024),
        LLM_MAX_NEW_TOKENS=1000, LLM_VISIBILITY_TIMEOUT_S=6, LLM_JOB_TIME_LIMIT_S=5,
        LLM_LEASE_TTL_S=2,
    )  # fmt: skip
    worker = WorkerProcess("blip", env, tmp_path / "logs", concurrency=2)
    celery = make_celery(Settings(redis_url=redis_server.url))

    def send(job_id: str, request: JobRequest) -> None:
        record = JobRecord.new(job_id, request).to_hash()
        redis_server.client().hset(keys.job(job_id), mapping=record)
        celery.send_task(keys.TASK_NAME, args=[job_id], task_id=job_id, queue=keys.QUEUE)

    def final(job_id: str) -> dict[str, str]:
        record = redis_server.client().hgetall(keys.job(job_id))
        if not worker.alive:
            raise AssertionError(f"the worker exited:\n{worker.log_tail()}")
        return record if record.get("status") in FINAL else {}

    try:
        worker.start(redis_server.url)
        redis = redis_server.client()
        send("during", JobRequest(prompt="First Citizen:", max_new_tokens=300, eos=False, seed=5))
        wait_until(lambda: redis.xlen(keys.events("during")) > 0, 30, message="first token")

        redis_server.kill()  # down while the job runs, its message unacked (acks_late)
        down_at = time.monotonic()
        wait_until(lambda: "Connection to broker lost" in worker.log_path.read_text(), 10,
                   message="the worker noticing")  # fmt: skip
        time.sleep(max(0.0, down_at + 4.0 - time.monotonic()))  # the outage: 4 s of clock
        redis_server.start()  # the same port, the same AOF
        redis = redis_server.client()

        during = wait_until(lambda: final("during"), 30, 0.1, "the running job final")
        send("after", JobRequest(prompt="All:", max_new_tokens=8, seed=6))
        after = wait_until(lambda: final("after"), 30, 0.1, "a job sent after the outage final")
        wait_until(lambda: not redis.hlen("unacked") and not redis.llen(keys.QUEUE), 20, 0.1,
                   "no message left unacked or queued")  # fmt: skip

        assert worker.alive
        assert during["status"] == "succeeded" and during["attempts"] == "1", during
        assert during["completion_tokens"] == "300"
        assert streamed(redis.xrange(keys.events("during"))) == (during["text"], 300)
        assert sum(f["type"] == "done" for _, f in redis.xrange(keys.events("during"))) == 1
        assert after["status"] == "succeeded", after
    finally:
        celery.close()
        worker.stop()
        redis_server.stop()


def test_sigterm_lets_the_running_job_finish_before_the_worker_exits(
    stack: Any, client: Any
) -> None:
    job_id = submit(client, {**LONG, "seed": 12})
    worker = running_on(stack, client, job_id)
    assert healthcheck(worker) == 0  # the readiness probe sees this host's fresh heartbeat

    worker.signal(signal.SIGTERM)  # Celery's warm shutdown
    exit_code = worker.wait(timeout_s=60)
    final = job(client, job_id)

    assert exit_code == 0
    assert healthcheck(worker) == 1  # no worker left on this host
    assert final["status"] == "succeeded" and final["attempts"] == 1
    assert final["result"]["completion_tokens"] == 300
    assert not stack["redis"].client().exists(keys.worker(worker.nodename))  # heartbeat gone
