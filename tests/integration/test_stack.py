"""`lmctl stack` / services.stack.Stack: every process up as plain processes, then all down.

Real processes on free ports under a tmp folder. The first-start path (MLflow, training and
promoting a model) runs in test_worker_hot_swap.py, which builds on it.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from typer.testing import CliRunner

from services.common import keys
from services.stack import Stack, StackConfig, StackError, StackState, stack_app
from tests.helpers.services import make_model_dir, wait_until

pytestmark = pytest.mark.integration


def run_job(api_url: str) -> dict[str, Any]:
    client = httpx.Client(base_url=api_url, timeout=30)
    job_id = client.post("/jobs", json={"prompt": "All:", "max_new_tokens": 8}).json()["id"]
    return wait_until(
        lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] != "queued"
        and j["status"] != "running" and j,
        60, message="stack job final",
    )  # fmt: skip


def all_dead(state: StackState) -> bool:
    from services.stack import _alive

    return not any(_alive(pid) for pid in state.pids.values())


def test_detached_stack_serves_jobs_and_down_stops_every_process(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "model")
    root = tmp_path / ".stack"
    config = StackConfig(root=root, model_uri=str(model_dir), mlflow=False, api_port=0,
                         redis_port=0, max_batch=2)  # fmt: skip

    state = Stack(config).up(detach=True, echo=False)
    try:
        saved = json.loads((root / "state.json").read_text())
        assert saved["api_url"] == state.api_url
        assert set(saved["pids"]) == {"redis", "worker", "api"}
        assert httpx.get(f"{state.api_url}/readyz").status_code == 200
        assert run_job(state.api_url)["status"] == "succeeded"
        with pytest.raises(StackError, match="already running"):
            Stack(config).up(detach=True, echo=False)
        status = CliRunner().invoke(stack_app, ["status", "--root", str(root)])
        assert json.loads(status.output)["alive"] == {"redis": True, "worker": True, "api": True}
    finally:
        down = CliRunner().invoke(stack_app, ["down", "--root", str(root)])  # a new process would

    assert "stack stopped" in down.output
    assert all_dead(state)
    assert not (root / "state.json").exists()
    assert (root / "redis" / "appendonlydir").is_dir()  # AOF on, data under the stack's folder


def test_stack_takes_max_batch_and_concurrency_from_llm_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_MAX_BATCH", "3")
    monkeypatch.setenv("LLM_WORKER_CONCURRENCY", "5")
    model_dir = make_model_dir(tmp_path / "model")
    config = StackConfig(root=tmp_path / ".stack", model_uri=str(model_dir), mlflow=False,
                         api_port=0, redis_port=0)  # fmt: skip
    stack = Stack(config)
    state = stack.up(detach=True, echo=False)
    try:
        client = redis.Redis.from_url(state.redis_url, decode_responses=True)
        beat = json.loads(client.get(keys.worker(f"stack@{socket.gethostname()}")) or "{}")
        client.close()
        assert beat["max_batch"] == 3
        assert "concurrency: 5 (thread)" in Path(state.logs["worker"]).read_text()
    finally:
        stack.down()
