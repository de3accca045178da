"""Model hot swap under load, on the local stack's first start (MLflow, train, promote).

`Stack` starts a real MLflow server (SQLite), trains a tiny model with the real trainer, registers
and promotes it, then runs a real worker on models:/llm@production and the API. A second version
is promoted while jobs keep arriving: no job may fail or be dropped.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from services.stack import Stack, StackConfig
from tests.helpers.services import TOKENIZER_TEXT, make_model_dir, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("hot-swap")
    corpus = tmp / "corpus.txt"
    corpus.write_text(TOKENIZER_TEXT * 40)
    config = StackConfig(
        root=tmp / ".stack", api_port=0, redis_port=0, mlflow_port=0, max_batch=4,
        train_overrides=[
            "model=tiny", "data=text", f"data.source={corpus}", "train.max_steps=2",
            "train.batch_size=2", "train.eval_interval=0", "train.eval_batches=1",
            f"train.checkpoint_dir={tmp / 'ckpt'}", f"data.cache_dir={tmp / 'data'}",
            "train.progress=false",
        ],
        extra_env={"LLM_MODEL_POLL_S": "0.5", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    stack = Stack(config)
    state = stack.up(detach=True, echo=False)
    try:
        yield state, tmp
    finally:
        stack.down()


def test_first_start_trains_registers_and_promotes_the_served_model(stack: Any) -> None:
    state, _ = stack
    client = httpx.Client(base_url=state.api_url, timeout=30)
    job_id = client.post("/jobs", json={"prompt": "All:", "max_new_tokens": 8}).json()["id"]
    job = wait_until(lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] in FINAL
                     and j, 60, message="job final")  # fmt: skip

    assert state.model_uri == "models:/llm@production"
    assert job["status"] == "succeeded", job
    assert job["model"]["name"] == "llm" and job["model"]["version"] == "1"
    assert job["model"]["run_id"]


def test_promoting_a_new_version_under_load_fails_no_job_and_results_name_both(
    stack: Any,
) -> None:
    from lmcore.checkpoint import load_model_dir
    from lmcore.generate import SamplingParams, generate
    from lmcore.model_uri import resolve_model_uri
    from lmcore.registry import promote
    from lmcore.tracking import MlflowTracker

    state, tmp = stack
    uri = state.mlflow_url
    # Version 2: another model, with another tokenizer, registered but not yet promoted.
    tracker = MlflowTracker(uri, "serving-tests")
    tracker.start_run()
    v2 = tracker.log_model_dir(make_model_dir(tmp / "model-v2", seed=2), "llm", alias=None)
    tracker.end_run()
    assert v2.version == "2"

    jobs = _submit_while(state.api_url, lambda: promote("llm", "2", "production", tracking_uri=uri))

    assert [j["status"] for j in jobs] == ["succeeded"] * len(jobs)
    assert {j["model"]["version"] for j in jobs} == {"1", "2"}
    # Each result is exactly what the version it names generates for that request.
    models = {
        v: load_model_dir(resolve_model_uri(f"models:/llm/{v}", tmp / "cache", uri).path)
        for v in ("1", "2")
    }
    for job in jobs:
        loaded, req = models[job["model"]["version"]], job["request"]
        params = SamplingParams(max_new_tokens=req["max_new_tokens"], seed=req["seed"], eos=False)
        want = generate(loaded.model, loaded.tokenizer, [req["prompt"]], params)[0].text
        assert job["result"]["text"] == want, job["id"]


def _submit_while(url: str, promote_now: Any) -> list[dict[str, Any]]:
    """Keep jobs flowing; promote after the first few; stop once the new version answered some."""
    client = httpx.Client(base_url=url, timeout=30)
    ids: list[str] = []
    stop = threading.Event()

    def feed() -> None:
        i = 0
        while not stop.is_set():
            body = {"prompt": f"Citizen {i}:", "max_new_tokens": 24, "seed": i, "eos": False}
            resp = client.post("/jobs", json=body)
            assert resp.status_code == 202, resp.text
            ids.append(resp.json()["id"])
            i += 1
            stop.wait(0.05)

    def final(job_id: str) -> dict[str, Any] | None:
        job = client.get(f"/jobs/{job_id}").json()
        return job if job["status"] in FINAL else None

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        wait_until(lambda: len(ids) >= 10, 60, message="first jobs submitted")
        promote_now()

        def new_version_answered() -> bool:
            done = [j for j in map(final, list(ids)) if j]
            return sum(j["model"]["version"] == "2" for j in done) >= 5

        wait_until(new_version_answered, 120, 0.2, "jobs answered by the new version")
    finally:
        stop.set()
        feeder.join()
    return [wait_until(lambda j=j: final(j), 60, message=f"job {j}") for j in ids]


def test_a_version_that_failed_to_swap_is_not_retried_until_the_alias_moves(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A promoted version that cannot load (its config.json is corrupt) is tried once, not at
    every alias poll beside the serving model; the heartbeat names it; the next promotion is
    served. A real MLflow registry (SQLite), a real Redis, the worker runtime in this process."""
    import json
    import logging

    from lmcore.registry import promote
    from lmcore.tracking import MlflowTracker
    from services.common import keys
    from services.common.settings import Settings
    from services.worker.runtime import WorkerRuntime
    from tests.helpers.redis_server import redis_server

    (tmp_path / "mlflow").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "refused-version")
    tracker.start_run()
    broken = make_model_dir(tmp_path / "v2", seed=2)
    (broken / "config.json").write_text("{not json")
    versions = [tracker.log_model_dir(path, "llm", alias=None).version for path in (
        make_model_dir(tmp_path / "v1", seed=1), broken, make_model_dir(tmp_path / "v3", seed=3))]
    tracker.end_run()
    assert versions == ["1", "2", "3"]
    promote("llm", "1", "production", tracking_uri=uri)
    caplog.set_level(logging.DEBUG, logger="services.worker.runtime")

    def logged(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    with redis_server(tmp_path / "redis", appendonly=False) as server:
        settings = Settings(
            redis_url=server.url, model_uri="models:/llm@production", mlflow_tracking_uri=uri,
            model_cache_dir=str(tmp_path / "cache"), model_poll_s=0.1, heartbeat_s=0.2,
            compile_decode="false",
        )  # fmt: skip
        runtime = WorkerRuntime(settings, "w1", on_engine_death=lambda: None)
        runtime.start()
        client = server.client()

        def beat() -> dict[str, Any]:
            return json.loads(client.get(keys.worker("w1")) or "{}")

        try:
            assert runtime.serving is not None and runtime.serving.ref.version == "1"
            promote("llm", "2", "production", tracking_uri=uri)
            # Tries (each logs the move) plus polls that passed it by: at least 8 polls.
            wait_until(lambda: logged("moved 1 -> 2") + logged("names version 2, which failed")
                       >= 8, 60, message="eight alias polls after the promotion")  # fmt: skip

            assert logged("moved 1 -> 2") == 1  # loaded once, not at every poll
            assert runtime.serving.ref.version == "1"
            refused = wait_until(lambda: beat().get("refused_model"), 10, message="report")
            assert refused["version"] == "2" and "config.json" in refused["error"]
            assert refused["retry_in_s"] is None  # a corrupt model dir cannot fix itself

            promote("llm", "3", "production", tracking_uri=uri)  # the alias moves on
            wait_until(lambda: runtime.serving.ref.version == "3", 60, message="version 3")
            wait_until(lambda: beat().get("model", {}).get("version") == "3"
                       and "refused_model" not in beat(), 10, message="a clean heartbeat")
        finally:
            runtime.stop(timeout_s=5)


def test_after_two_promotions_the_workers_cache_holds_the_served_and_previous_version_only(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Each promotion made every worker download the new version beside all the old ones, until
    the chart's emptyDir sizeLimit evicted them all at once. A real MLflow registry (SQLite), a
    real Redis, the worker runtime in this process, its cache in tmp/cache."""
    import json
    import logging
    import os
    import time

    from lmcore.registry import promote
    from lmcore.tracking import MlflowTracker
    from services.common.settings import Settings
    from services.worker.runtime import WorkerRuntime
    from tests.helpers.redis_server import redis_server

    (tmp_path / "mlflow").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "cache-pruning")
    tracker.start_run()
    versions = [tracker.log_model_dir(make_model_dir(tmp_path / f"v{i}", seed=i), "llm",
                                      alias=None).version for i in (1, 2, 3)]  # fmt: skip
    tracker.end_run()
    assert versions == ["1", "2", "3"]
    promote("llm", "1", "production", tracking_uri=uri)
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="services.worker.loader")

    def cached_versions() -> list[str]:
        found = cache.glob("*/registry/llm/*")
        return sorted(p.name for p in found if p.is_dir() and not p.name.startswith("."))

    def hours_pass() -> None:  # promotions come hours apart: no other process is loading one
        old = time.time() - 2 * 3600
        for p in cache.rglob("*"):
            os.utime(p, (old, old), follow_symlinks=False)

    with redis_server(tmp_path / "redis", appendonly=False) as server:
        settings = Settings(
            redis_url=server.url, model_uri="models:/llm@production", mlflow_tracking_uri=uri,
            model_cache_dir=str(cache), model_poll_s=0.1, heartbeat_s=0.2, compile_decode="false",
        )  # fmt: skip
        runtime = WorkerRuntime(settings, "w1", on_engine_death=lambda: None)
        runtime.start()
        try:
            assert runtime.serving is not None and cached_versions() == ["1"]
            for version in ("2", "3"):
                hours_pass()
                promote("llm", version, "production", tracking_uri=uri)
                wait_until(lambda v=version: runtime.serving.ref.version == v, 60,
                           message=f"serving version {version}")  # fmt: skip
            wait_until(lambda: cached_versions() == ["2", "3"], 30,
                       message=f"only versions 2 and 3 cached (have {cached_versions()})")
        finally:
            runtime.stop(timeout_s=5)
    # The outage fallback for the alias names what served last, which is still cached.
    record = json.loads(next(cache.glob("*/registry/llm/@production.json")).read_text())
    assert record["version"] == "3"
    assert "1 older model(s)" in caplog.text and "MB freed" in caplog.text
