"""The worker's first model load: errors that cannot fix themselves stop the worker at once;
the registry not being ready yet (no version under the alias) is waited out.

A real Redis, a real MLflow server and a real Celery worker process; no mocks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmcore.registry import current_version, promote
from lmcore.tracking import MlflowTracker
from services.common.settings import Settings
from services.worker.runtime import WorkerRuntime
from tests.helpers.mlflow_server import free_port, mlflow_server
from tests.helpers.redis_server import RedisServer, redis_server
from tests.helpers.services import WorkerProcess, make_model_dir, service_env, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis", appendonly=False) as srv:
        yield srv


def start_in_thread(runtime: WorkerRuntime) -> tuple[threading.Thread, list[BaseException]]:
    raised: list[BaseException] = []

    def start() -> None:
        try:
            runtime.start()
        except BaseException as exc:  # SystemExit included: that is what is being tested
            raised.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread, raised


def end(runtime: WorkerRuntime, thread: threading.Thread) -> None:
    if runtime.engine is not None:
        runtime.stop(timeout_s=5)
    else:  # never started its threads, so stop() has nothing to join: just end a retry loop
        runtime._stop.set()
        runtime.redis.close()
    thread.join(10)


def start_fails(settings: Settings, timeout_s: float = 30.0) -> BaseException:
    """What runtime.start() raised; a failure if it was still retrying after `timeout_s`."""
    runtime = WorkerRuntime(settings, "w1")
    thread, raised = start_in_thread(runtime)
    thread.join(timeout_s)
    try:
        assert not thread.is_alive(), f"still retrying the load after {timeout_s} s"
        assert raised, "the load succeeded"
        return raised[0]
    finally:
        end(runtime, thread)


def test_a_model_dir_failing_its_checks_stops_the_worker(
    server: RedisServer, tmp_path: Path
) -> None:
    model_dir = make_model_dir(tmp_path / "model")
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    settings = Settings(redis_url=server.url, model_uri=str(model_dir), device="cpu")
    exc = start_fails(settings)
    assert isinstance(exc, SystemExit)
    assert f"cannot load model {model_dir}" in str(exc) and "safetensors" in str(exc)


def test_a_device_this_machine_lacks_stops_the_worker(server: RedisServer, tmp_path: Path):
    missing = f"cuda:{torch.cuda.device_count()}"
    settings = Settings(redis_url=server.url, model_uri=str(make_model_dir(tmp_path / "model")),
                        device=missing)  # fmt: skip
    exc = start_fails(settings)
    assert isinstance(exc, SystemExit) and f"LLM_DEVICE={missing}" in str(exc)


def test_an_alias_with_no_version_yet_is_waited_for_then_loaded(
    server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with mlflow_server(tmp_path / "mlflow") as mlflow_uri:
        settings = Settings(redis_url=server.url, model_uri="models:/llm@production",
                            mlflow_tracking_uri=mlflow_uri, model_cache_dir=str(tmp_path / "cache"),
                            device="cpu", compile_decode="false")  # fmt: skip
        runtime = WorkerRuntime(settings, "w1")
        caplog.set_level(logging.ERROR, logger="services.worker.runtime")
        thread, raised = start_in_thread(runtime)
        try:
            wait_until(lambda: "retrying in" in caplog.text, 60, message="a retried load")
            assert thread.is_alive() and not raised
            tracker = MlflowTracker(mlflow_uri, retry_s=0.5)
            tracker.start_run("worker-loading")
            tracker.log_model_dir(make_model_dir(tmp_path / "model"), "llm", alias="production")
            tracker.end_run()
            thread.join(60)
            assert not thread.is_alive() and not raised
            assert runtime.serving is not None and runtime.serving.ref.version == "1"
        finally:
            end(runtime, thread)


def test_a_celery_worker_given_a_missing_model_path_exits_saying_why(
    server: RedisServer, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-model"
    worker = WorkerProcess("w-missing", service_env(server.url, missing), tmp_path / "logs")
    worker.spawn()
    try:
        code = worker.wait(timeout_s=120)  # importing torch and Celery on two busy cores
    except Exception:
        pytest.fail(f"the worker was still running after 120 s:\n{worker.log_tail()}")
    finally:
        worker.kill()
    log = worker.log_tail()
    assert code != 0
    assert f"cannot load model {missing}" in log and "does not exist" in log, log
    assert "retrying in" not in log


@pytest.mark.parametrize("uri", ["models:/llm", "models:/llm@", "models:/llm/v1", "runs:/",
                                 "models:/a/b@production"])
def test_malformed_registry_uris_stop_the_worker_with_the_reason(
    server: RedisServer, tmp_path: Path, uri: str
) -> None:
    """No registry change can make these load, yet the worker retried them every 30 s forever
    (never ready). MLflow is not even asked: the address is a closed port."""
    settings = Settings(redis_url=server.url, model_uri=uri, device="cpu",
                        mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",
                        model_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    exc = start_fails(settings, timeout_s=15)
    assert isinstance(exc, SystemExit)
    assert f"LLM_MODEL_URI={uri!r} is malformed" in str(exc)


def test_every_alias_uri_the_resolver_accepts_starts_the_alias_watcher(
    server: RedisServer, tmp_path: Path
) -> None:
    """`models:/llm@production/` and `models://llm@production` load as the alias; the watcher's
    stricter pattern did not match them, so promotions were silently never picked up."""
    with mlflow_server(tmp_path / "mlflow") as mlflow_uri:
        tracker = MlflowTracker(mlflow_uri, retry_s=0.5)
        tracker.start_run("worker-alias-forms")
        for seed in (0, 1):
            model_dir = make_model_dir(tmp_path / f"model{seed}", seed=seed)
            tracker.log_model_dir(model_dir, "llm", alias="production")
        tracker.end_run()
        for uri in ("models:/llm@production", "models:/llm@production/",
                    "models://llm@production"):
            serving_now = current_version("llm", "production", mlflow_uri).version
            settings = Settings(redis_url=server.url, model_uri=uri, device="cpu",
                                mlflow_tracking_uri=mlflow_uri, compile_decode="false",
                                model_cache_dir=str(tmp_path / "cache"), model_poll_s=0.2)
            runtime = WorkerRuntime(settings, "w1")
            thread, raised = start_in_thread(runtime)
            try:
                thread.join(60)
                assert not raised and runtime.serving is not None
                assert runtime.serving.ref.version == serving_now
                moved_to = "1" if serving_now == "2" else "2"
                promote("llm", moved_to, "production", mlflow_uri)
                wait_until(lambda: runtime.serving.ref.version == moved_to, 30,
                           message=f"{uri} to follow the alias to version {moved_to}")
            finally:
                end(runtime, thread)
