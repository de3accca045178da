"""A worker whose engine thread dies: it stops counting as ready, asks to be shut down, and a
job it is handed meanwhile ends `failed` instead of staying `running` with no one on it. One whose
engine hangs (a step that never returns) is treated as dead the same way, and hands its job back.

A real Redis and the worker runtime in this process (no Celery): the engine thread is killed by
a BaseException from a token callback, the one way out of its loop; a hang is a decode step
patched to block. test_worker_engine_stall.py runs the hang through real Celery workers.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcore.engine import Engine, EngineRequest
from lmcore.generate import SamplingParams
from services.common import keys
from services.common.jobs import JobRecord, JobRequest
from services.common.settings import Settings
from services.worker import healthcheck
from services.worker.healthcheck import fresh_workers
from services.worker.runtime import EngineStalledError, WorkerRuntime
from services.worker.tasks import run_job
from tests.helpers.redis_server import RedisServer, redis_server
from tests.helpers.services import free_port, make_model_dir, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis", appendonly=False) as srv:
        yield srv


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the kill
def test_a_worker_whose_engine_died_stops_beating_and_fails_new_jobs_cleanly(
    server: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(redis_url=server.url, model_uri=str(make_model_dir(tmp_path / "model")),
                        heartbeat_s=0.1, compile_decode="false")  # fmt: skip
    asked_to_shut_down = threading.Event()
    runtime = WorkerRuntime(settings, "w1", on_engine_death=asked_to_shut_down.set)
    runtime.start()
    client = server.client()
    try:
        wait_until(lambda: fresh_workers(client), message="first heartbeat")

        def escape(token_id: int, delta: str) -> Any:
            raise SystemExit("a BaseException out of a step")

        assert runtime.engine is not None
        runtime.engine.submit(EngineRequest([1], SamplingParams(max_new_tokens=3),
                                            on_token=escape))  # fmt: skip
        assert asked_to_shut_down.wait(10)
        assert fresh_workers(client) == []  # /readyz and the probe stop counting it at once

        job_id = uuid.uuid4().hex
        record = JobRecord.new(job_id, JobRequest(prompt="hello", max_new_tokens=4))
        client.hset(keys.job(job_id), mapping=record.to_hash())
        assert run_job(runtime, job_id) == "failed"
        assert client.hget(keys.job(job_id), "status") == "failed"
        assert "engine stopped" in client.hget(keys.job(job_id), "error")
        assert [f["type"] for _, f in client.xrange(keys.events(job_id))] == ["done"]
    finally:
        runtime.stop(timeout_s=5)


@pytest.fixture
def hung_decode_step(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Every decode step blocks (a kernel that never returns) until the event is set."""
    release = threading.Event()
    real = Engine._run_step

    def hung(self: Engine, *args: Any, **kwargs: Any) -> Any:
        release.wait()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "_run_step", hung)
    yield release
    release.set()


def new_job(client: Any, max_new_tokens: int = 8) -> str:
    job_id = uuid.uuid4().hex
    request = JobRequest(prompt="hello", max_new_tokens=max_new_tokens, eos=False, seed=1)
    client.hset(keys.job(job_id), mapping=JobRecord.new(job_id, request).to_hash())
    return job_id


def test_a_worker_whose_engine_stalls_stops_beating_and_hands_its_job_back(
    server: RedisServer, tmp_path: Path, hung_decode_step: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    settings = Settings(redis_url=server.url, model_uri=str(make_model_dir(tmp_path / "model")),
                        heartbeat_s=0.1, compile_decode="false", engine_stall_s=1)  # fmt: skip
    asked_to_shut_down = threading.Event()
    runtime = WorkerRuntime(settings, "w1", on_engine_stall=asked_to_shut_down.set)
    runtime.start()
    client = server.client()
    outcome: list[BaseException | str] = []
    try:
        wait_until(lambda: fresh_workers(client), message="first heartbeat")
        job_id = new_job(client)

        def task() -> None:
            try:
                outcome.append(run_job(runtime, job_id))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=task)
        thread.start()
        assert asked_to_shut_down.wait(30)
        assert fresh_workers(client) == []  # /readyz and the probe stop counting it at once
        monkeypatch.setenv("LLM_REDIS_URL", server.url)
        assert healthcheck.main(["--live"]) == 1  # the liveness probe fails too

        thread.join(30)
        assert len(outcome) == 1 and isinstance(outcome[0], EngineStalledError)  # handed back
        record = client.hgetall(keys.job(job_id))
        assert record["status"] == "running"  # no result: a healthy worker's delivery runs it
        assert record["worker"].startswith("w1:")
        with pytest.raises(EngineStalledError):  # a job handed to it meanwhile goes back too
            run_job(runtime, new_job(client))
    finally:
        hung_decode_step.set()
        runtime.stop(timeout_s=5)


def test_the_worker_probe_fails_for_a_stalled_engine_before_the_worker_acts_on_it(
    server: RedisServer, tmp_path: Path, hung_decode_step: threading.Event,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The heartbeat reports how long the engine has had work and no step: a probe with the same
    LLM_ENGINE_STALL_S fails on a beat written just before the worker drops it (here the worker's
    bound is longer, so that beat stays)."""
    settings = Settings(redis_url=server.url, model_uri=str(make_model_dir(tmp_path / "model")),
                        heartbeat_s=0.1, compile_decode="false", engine_stall_s=3600)  # fmt: skip
    runtime = WorkerRuntime(settings, "w1", on_engine_stall=lambda: None)
    runtime.start()
    client = server.client()
    monkeypatch.setenv("LLM_REDIS_URL", server.url)
    monkeypatch.setenv("LLM_ENGINE_STALL_S", "1")
    try:
        wait_until(lambda: fresh_workers(client), message="first heartbeat")
        assert healthcheck.main([]) == 0 and healthcheck.main(["--live"]) == 0
        assert runtime.engine is not None
        runtime.engine.submit(EngineRequest([1], SamplingParams(max_new_tokens=3)))
        wait_until(lambda: fresh_workers(client)[0]["progress_age_s"] > 1, 30, 0.1,
                   "a heartbeat reporting the stall")  # fmt: skip
        capsys.readouterr()
        assert healthcheck.main([]) == 1
        assert healthcheck.main(["--live"]) == 1
        assert "engine stalled" in capsys.readouterr().err
    finally:
        hung_decode_step.set()
        runtime.stop(timeout_s=5)


def test_the_liveness_probe_passes_while_redis_is_unreachable_and_readiness_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Redis outage is not the worker's fault: restarting it would kill the jobs it carries
    # through the outage. Readiness still reports it.
    monkeypatch.setenv("LLM_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert healthcheck.main(["--live"]) == 0
    assert healthcheck.main([]) == 1


def test_a_job_failing_mid_generation_ends_its_stream_holding_its_recorded_text(
    server: RedisServer, tmp_path: Path
) -> None:
    """A diverged checkpoint (NaN position embeddings from position 12 on) fails its job after
    some tokens have streamed: the record keeps that partial text and its token count, as a
    time limit's does, and a client reading the stream to `done` holds exactly that."""
    import torch

    from lmcore.checkpoint import save_model_dir
    from lmcore.tokenizer import Tokenizer
    from services.worker.token_sink import streamed
    from tests.helpers.models import context_sensitive_model
    from tests.helpers.services import TOKENIZER_TEXT

    tokenizer = Tokenizer.train([TOKENIZER_TEXT] * 4, vocab_size=320)
    model = context_sensitive_model(0, vocab_size=tokenizer.vocab_size, block_size=128)
    with torch.no_grad():
        model.pos_emb.weight[12:] = float("nan")
    model_dir = save_model_dir(tmp_path / "model", model, tokenizer,
                               {"name": "diverged", "version": "1"})  # fmt: skip
    settings = Settings(redis_url=server.url, model_uri=str(model_dir), compile_decode="false")
    runtime = WorkerRuntime(settings, "w1", on_engine_death=lambda: None)
    runtime.start()
    client = server.client()
    try:
        job_id = uuid.uuid4().hex
        request = JobRequest(prompt="All:", max_new_tokens=40, eos=False, seed=1)
        client.hset(keys.job(job_id), mapping=JobRecord.new(job_id, request).to_hash())
        assert run_job(runtime, job_id) == "failed"

        record = client.hgetall(keys.job(job_id))
        entries = client.xrange(keys.events(job_id))
        assert "NaN or infinite" in record["error"]
        prompt_tokens = len(tokenizer.encode("All:"))
        assert int(record["completion_tokens"]) == 12 - prompt_tokens + 1  # then position 12
        assert record["text"]
        assert entries[-1][1]["type"] == "done"
        assert streamed(entries[:-1]) == (record["text"], int(record["completion_tokens"]))
    finally:
        runtime.stop(timeout_s=5)
