"""The local stack as plain processes: Redis (AOF), MLflow, a trained + promoted model, worker, API.

`lmctl stack up [--detach]` / `lmctl stack down`, and `Stack(...).up(detach=True)` / `.down()` for
scripts; state (pids, URLs, ports) lives in `.stack/state.json`, written as each process starts.
It only stops the processes it launched: a pid counts only while its start time still matches.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError

from lmcore.mlflow_client import TrackingError
from services.common.processes import (
    MAX_PORT,
    free_port,
    group_carries_env,
    is_ours,
    start_ticks,
    terminate_group,
)
from services.common.redis_binary import RedisNotFoundError, find_redis_server
from services.common.settings import Settings

MODEL_NAME = "llm"
ALIAS = "production"
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0  # SIGTERM (warm shutdown for the worker, AOF flush for Redis), then SIGKILL
# Started in this order, stopped in reverse; the trainer runs (to completion) only when needed.
ORDER = ("redis", "mlflow", "trainer", "worker", "api")
# In every process the stack starts (their children inherit it): `down` knows a group whose
# leader has died (MLflow's, leaving its uvicorn) as the stack's by its members carrying it.
STACK_ID_ENV = "LMCTL_STACK_ID"
# Redis allocates a stream's newest node at stream-node-max-bytes and keeps it: with the default
# (4096) each job's events stream, a few small entries, held 4 KB for the job's whole TTL.
# The chart (redis.streamNodeMaxBytes) and docker-compose.yml use the same.
STREAM_NODE_MAX_BYTES = 512


def redis_command(port: int, host: str, data: Path) -> list[str]:
    """The stack's redis-server argv: AOF in `data`, no RDB snapshots, small stream nodes."""
    return [
        str(find_redis_server()), "--port", str(port), "--bind", host,
        "--dir", str(data), "--appendonly", "yes", "--appendfsync", "everysec",
        "--save", "", "--daemonize", "no", "--protected-mode", "no",
        "--stream-node-max-bytes", str(STREAM_NODE_MAX_BYTES),
    ]  # fmt: skip


class StackError(RuntimeError):
    """The stack could not start (or is already running); the message says what to do."""


@dataclass
class StackConfig:
    root: Path = Path(".stack")
    host: str = "127.0.0.1"
    api_port: int = 8000
    mlflow_port: int = 5000
    redis_port: int = 6379
    # None: serve models:/llm@production, training and promoting one first if none is registered.
    model_uri: str | None = None
    mlflow: bool = True  # with a local model_uri the stack can run without MLflow
    train_overrides: list[str] = field(default_factory=lambda: ["model=small", "train=cpu"])
    # None: the worker's own settings (LLM_MAX_BATCH, LLM_WORKER_CONCURRENCY) decide.
    max_batch: int | None = None
    worker_concurrency: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    show_training: bool = True  # echo the trainer's progress bar as well as logging it


@dataclass
class StackState:
    """What `up` wrote to <root>/state.json: enough for `down`, the demo and curl.

    Rewritten after each process starts, so `down` finds them even if `up` dies half way; the
    URLs are empty and `ready` false until then.
    """

    root: str
    started_at: float
    api_url: str = ""
    redis_url: str = ""
    mlflow_url: str | None = None
    model_uri: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    # /proc/PID/stat's start time of each pid: a pid whose process has since changed is not ours.
    start_ticks: dict[str, int | None] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    ready: bool = False
    stack_id: str = ""  # STACK_ID_ENV's value in this stack's processes ("": none recorded)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def running(self) -> dict[str, int]:
        """The recorded processes that are still the ones the stack started."""
        return {name: pid for name, pid in self.pids.items()
                if is_ours(pid, self.start_ticks.get(name))}  # fmt: skip

    def left_behind(self) -> dict[str, int]:
        """Recorded process groups whose leader is gone but whose members, the stack's by their
        STACK_ID_ENV, still run (MLflow's uvicorn after its main process crashed): the group
        is the one the stack started, so all of it is the stack's."""
        return {name: pid for name, pid in self.pids.items()
                if not is_ours(pid, self.start_ticks.get(name))
                and group_carries_env(pid, STACK_ID_ENV, self.stack_id)}  # fmt: skip

    @classmethod
    def load(cls, root: Path) -> StackState | None:
        try:
            return cls(**json.loads((root / "state.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None


class Stack:
    def __init__(self, config: StackConfig | None = None, **overrides: Any) -> None:
        self.config = config or StackConfig(**overrides)
        self.root = Path(self.config.root).resolve()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.state: StackState | None = None

    # -- up ---------------------------------------------------------------------------------

    def up(self, detach: bool = False, echo: bool = True) -> StackState:
        """Start everything and wait until the API is ready; detach=False blocks until Ctrl-C.

        Holds <root>/lock meanwhile, so a second `up` on the same root fails instead of starting
        a second Redis on the same files; SIGTERM and SIGHUP stop it the way Ctrl-C does.
        """
        try:
            with self._locked(), _signals_interrupt():
                state = self._start()
                if echo:
                    print(banner(state, detach, os.environ.get("LLM_API_KEYS")))
                if not detach:
                    self._block()
                return state
        except (RedisNotFoundError, OSError, TrackingError, ValidationError) as exc:
            raise StackError(" ".join(str(exc).split()) or type(exc).__name__) from exc

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "lock").open("a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "?"
                raise StackError(f"`stack up` (pid {holder}) is already running from "
                                 f"{self.root}; stop it first (Ctrl-C or `lmctl stack down`)"
                                 ) from None  # fmt: skip
            lock.truncate(0)  # "a+" writes at the end whatever the position
            lock.write(str(os.getpid()))
            lock.flush()
            yield  # closing the file releases the lock

    def _start(self) -> StackState:
        old = StackState.load(self.root)
        if old is not None and old.running():
            raise StackError(f"a stack is already running from {self.root} "
                             "(stop it with `lmctl stack down`)")  # fmt: skip
        # Groups whose leader died but whose members run on (MLflow's uvicorn holding its port):
        # state.json is the only record of them, which this `up` would overwrite or delete.
        left = old.left_behind() if old is not None else {}
        if left:
            groups = ", ".join(f"{name} (process group {pid})" for name, pid in left.items())
            raise StackError(f"the stack started from {self.root} left processes running: "
                             f"{groups}; stop them with `lmctl stack down` first")  # fmt: skip
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        cfg = self.config
        settings = Settings()  # a bad LLM_* value fails here, not in a worker's log
        max_batch = cfg.max_batch or settings.max_batch
        self.state = state = StackState(root=str(self.root), started_at=time.time(),
                                        stack_id=secrets.token_hex(8))  # fmt: skip
        try:
            state.redis_url = self._start_redis(self._port(cfg.redis_port))
            if cfg.mlflow:
                state.mlflow_url = self._start_mlflow(self._port(cfg.mlflow_port))
            state.model_uri = cfg.model_uri or self._ensure_model(state.mlflow_url)
            env = self._service_env(state.redis_url, state.model_uri, state.mlflow_url, max_batch)
            self._spawn("worker", self._worker_cmd(), env)
            state.api_url = f"http://{cfg.host}:{self._port(cfg.api_port)}"
            self._spawn("api", self._api_cmd(state.api_url), env)
            self._wait_http(f"{state.api_url}/healthz", "api")
            # The API answers; readiness now waits on a worker's heartbeat, so a failure from
            # here on (a model it cannot load, say) is the worker's: its log says why.
            self._wait_http(f"{state.api_url}/readyz", "worker")
            state.ready = True
            self._write_state()
        except BaseException:
            self._stop_procs()
            self.state = None
            (self.root / "state.json").unlink(missing_ok=True)
            raise
        return state

    def _port(self, preferred: int) -> int:
        """The preferred port if free, else the next free one above it (0 = any free port)."""
        try:
            port = free_port(self.config.host, preferred)
        except ValueError as exc:
            raise StackError(str(exc)) from None
        if preferred and port != preferred:
            print(f"port {preferred} is taken; using {port}")
        return port

    def _start_redis(self, port: int) -> str:
        data = self.root / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self._spawn("redis", redis_command(port, self.config.host, data), dict(os.environ))
        self._wait(lambda: _redis_ping(self.config.host, port), "redis")
        return f"redis://{self.config.host}:{port}/0"

    def _start_mlflow(self, port: int) -> str:
        data = self.root / "mlflow"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{data / 'mlflow.db'}",
            "--artifacts-destination", str(data / "artifacts"),
            "--host", self.config.host, "--port", str(port), "--workers", "1",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        # No background job runner (a dozen huey processes): the stack never uses MLflow jobs.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self._spawn("mlflow", cmd, env)
        url = f"http://{self.config.host}:{port}"
        self._wait_http(f"{url}/health", "mlflow")
        return url

    def _ensure_model(self, mlflow_url: str | None) -> str:
        """models:/llm@production, after training and promoting a first version if needed."""
        from lmcore.registry import current_version, promote

        if mlflow_url is None:
            raise StackError("without MLflow the stack needs a model_uri (a local model dir)")
        if current_version(MODEL_NAME, ALIAS, mlflow_url) is None:
            print(f"no {MODEL_NAME}@{ALIAS} registered: training one "
                  f"({' '.join(self.config.train_overrides)}); log: {self._log('trainer')}")
            env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url, "PYTHONPATH": _pythonpath()}
            overrides = [f"train.checkpoint_dir={self.root / 'checkpoints'}",
                         *self.config.train_overrides]  # fmt: skip
            code = self._train([sys.executable, "-m", "services.trainer", *overrides], env)
            if code != 0:
                raise StackError(f"training failed (exit {code}); see {self._log('trainer')}")
            trained = current_version(MODEL_NAME, "candidate", mlflow_url)
            if trained is None or trained.version is None:
                raise StackError(f"training registered no {MODEL_NAME}@candidate version")
            promote(MODEL_NAME, trained.version, ALIAS, tracking_uri=mlflow_url)
            print(f"promoted {MODEL_NAME} version {trained.version} to @{ALIAS}")
        return f"models:/{MODEL_NAME}@{ALIAS}"

    def _service_env(
        self, redis_url: str, model_uri: str, mlflow_url: str | None, max_batch: int
    ) -> dict[str, str]:
        env = {
            **os.environ,
            "PYTHONPATH": _pythonpath(),
            "LLM_REDIS_URL": redis_url,
            "LLM_MODEL_URI": model_uri,
            "LLM_MAX_BATCH": str(max_batch),
            "LLM_MODEL_CACHE_DIR": str(self.root / "models"),
        }
        if self.config.worker_concurrency:
            env["LLM_WORKER_CONCURRENCY"] = str(self.config.worker_concurrency)
        if mlflow_url:
            env["MLFLOW_TRACKING_URI"] = mlflow_url
        return {**env, **self.config.extra_env}

    def _worker_cmd(self) -> list[str]:
        # No --concurrency: the worker's settings give it (LLM_WORKER_CONCURRENCY, else
        # 2 x LLM_MAX_BATCH), as documented.
        return [
            sys.executable, "-m", "celery", "-A", "services.worker.celery_app:app", "worker",
            "--pool", "threads", "-n", "stack@%h",
            "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        ]  # fmt: skip

    def _api_cmd(self, api_url: str) -> list[str]:
        port = api_url.rsplit(":", 1)[1]
        return [
            sys.executable, "-m", "uvicorn", "services.api.app:create_app", "--factory",
            "--host", self.config.host, "--port", port,
        ]  # fmt: skip

    # -- processes --------------------------------------------------------------------------

    def _log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str], piped: bool = False
    ) -> subprocess.Popen[bytes]:
        assert self.state is not None
        env = {**env, STACK_ID_ENV: self.state.stack_id}
        with self._log(name).open("ab") as log:
            # Own session: survives this process when detached, Ctrl-C reaches only us, and
            # `down` stops its whole process group (mlflow's uvicorn, say) at once.
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE if piped else log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.procs[name] = proc
        self.state.pids[name] = proc.pid
        self.state.start_ticks[name] = start_ticks(proc.pid)
        self.state.logs[name] = str(self._log(name))
        self._write_state()  # now, so that `down` finds it even if this process dies next
        return proc

    def _train(self, cmd: list[str], env: dict[str, str]) -> int:
        """Run the trainer to completion, copying its output to its log and, with
        show_training, to stderr. While it runs it is in state.json like the services."""
        proc = self._spawn("trainer", cmd, env, piped=True)
        assert proc.stdout is not None and self.state is not None
        with proc.stdout, self._log("trainer").open("ab") as log:
            # read1 returns what is there, so tqdm's carriage-return updates show as they happen.
            while chunk := proc.stdout.read1(4096):
                log.write(chunk)
                if self.config.show_training:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.buffer.flush()
        code = proc.wait()
        del self.procs["trainer"], self.state.pids["trainer"], self.state.start_ticks["trainer"]
        self._write_state()
        return code

    def _wait(self, ready: Any, name: str) -> None:
        """Poll ready() until true; fail at once if any child exits, naming its log."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            proc = self.procs[name]
            if proc.poll() is not None:
                raise StackError(f"{name} exited with {proc.returncode}; see {self._log(name)}")
            for other, p in self.procs.items():
                if p.poll() is not None:
                    raise StackError(f"{other} exited with {p.returncode}; see {self._log(other)}")
            if time.monotonic() > deadline:
                raise StackError(f"{name} not ready after {START_TIMEOUT_S:.0f} s; "
                                 f"see {self._log(name)}")  # fmt: skip
            time.sleep(0.2)

    def _wait_http(self, url: str, name: str) -> None:
        self._wait(lambda: _http_ok(url), name)

    def _write_state(self) -> None:
        assert self.state is not None
        path = self.root / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.state.to_json())
        tmp.replace(path)

    def _block(self) -> None:
        try:
            while all(p.poll() is None for p in self.procs.values()):
                time.sleep(0.5)
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            print(f"{', '.join(dead)} exited; stopping the stack (logs in {self.root / 'logs'})")
        except KeyboardInterrupt:
            print("\nstopping the stack...")
        finally:
            self.down()

    def _stop_procs(self) -> bool:
        stopped = False
        for name in reversed(ORDER):
            proc = self.procs.pop(name, None)
            if proc is not None:
                stopped |= proc.poll() is None
                terminate_group(proc.pid, STOP_TIMEOUT_S, proc)
        return stopped

    # -- down -------------------------------------------------------------------------------

    def down(self) -> bool:
        """Stop every process this stack (or a detached one from the same root) started."""
        stopped = self._stop_procs()
        state = self.state or StackState.load(self.root)
        if state is not None:
            running = {**state.left_behind(), **state.running()}
            for name in reversed(ORDER):
                if name in running:
                    terminate_group(running[name], STOP_TIMEOUT_S)
                    stopped = True
            (self.root / "state.json").unlink(missing_ok=True)
        self.state = None
        return stopped


def banner(state: StackState, detached: bool, api_keys: str | None = None) -> str:
    api = state.api_url
    auth = ""
    if api_keys:
        auth = f" -H 'Authorization: Bearer {api_keys.split(',')[0].strip()}'"
    lines = [
        "llm-pipeline stack is up:",
        f"  API     {api}  (docs {api}/docs, metrics {api}/metrics)",
        f"  MLflow  {state.mlflow_url or '(off)'}",
        f"  Redis   {state.redis_url}",
        f"  Model   {state.model_uri}",
        "",
        "Try:",
        f"  curl -s -X POST {api}/jobs{auth} -H 'Content-Type: application/json' \\",
        "       -d '{\"prompt\": \"First Citizen:\", \"max_new_tokens\": 64}'",
        f"  curl -N {api}/jobs/<id>/events{auth}      # stream its tokens (SSE)",
        f"  curl -s {api}/jobs/<id>{auth}             # the job record",
        f"  curl -s -X POST {api}/generate_text{auth} -H 'Content-Type: application/json' \\",
        "       -d '{\"prompt\": \"First Citizen:\", \"num_of_token_generated\": 50}'",
        "",
        f"Logs in {state.root}/logs. "
        + ("Stop with: lmctl stack down" if detached else "Ctrl-C stops everything."),
    ]
    return "\n".join(lines)


# -- small helpers ----------------------------------------------------------------------------


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, so they take Ctrl-C's cleanup path.

    Only the first one raises: a repeat must not cut that cleanup short. Signal handlers can
    only be set from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def interrupt(signum: int, frame: Any) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _pythonpath() -> str:
    repo = str(Path(__file__).resolve().parents[1])
    current = os.environ.get("PYTHONPATH")
    return f"{repo}{os.pathsep}{current}" if current else repo


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _redis_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# -- `lmctl stack` ----------------------------------------------------------------------------

stack_app = typer.Typer(help="Run Redis, MLflow, a worker and the API locally as plain processes.",
                        no_args_is_help=True)  # fmt: skip


@stack_app.command("up")
def up_command(
    detach: bool = typer.Option(False, "--detach", "-d", help="Return once ready; stop with down."),
    api_port: int = typer.Option(8000, min=0, max=MAX_PORT, help=f"API port (0-{MAX_PORT}; "
                                 "the next free one if taken; 0: any free one)."),  # fmt: skip
    mlflow_port: int = typer.Option(5000, min=0, max=MAX_PORT, help=f"MLflow port (0-{MAX_PORT}; "
                                    "the next free one if taken; 0: any free one)."),  # fmt: skip
    redis_port: int = typer.Option(6379, min=0, max=MAX_PORT, help=f"Redis port (0-{MAX_PORT}; "
                                   "the next free one if taken; 0: any free one)."),  # fmt: skip
    root: Path = typer.Option(Path(".stack"), help="Data, logs and state.json."),
    model_uri: str = typer.Option(None, help="Serve this URI or model dir instead of "
                                  "models:/llm@production (no training)."),  # fmt: skip
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Skip MLflow (needs --model-uri)."),
    max_batch: int = typer.Option(None, help="Jobs the worker's engine decodes together "
                                  "(default: LLM_MAX_BATCH, else 8)."),  # fmt: skip
    train: list[str] = typer.Option(None, help="Trainer overrides when a model must be trained "
                                    "(default: model=small train=cpu)."),  # fmt: skip
) -> None:
    """Start the stack; prints URLs and curl commands. Ctrl-C stops it (unless --detach)."""
    config = StackConfig(
        root=root, api_port=api_port, mlflow_port=mlflow_port, redis_port=redis_port,
        model_uri=model_uri, mlflow=not no_mlflow, max_batch=max_batch,
    )  # fmt: skip
    if train:
        config.train_overrides = list(train)
    try:
        Stack(config).up(detach=detach)
    except StackError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:  # while starting (once up, Ctrl-C stops it and returns)
        how = f" ({exc})" if str(exc) else ""
        typer.echo(f"error: interrupted{how}; stopped what had started", err=True)
        raise typer.Exit(130) from None


@stack_app.command("down")
def down_command(root: Path = typer.Option(Path(".stack"), help="The stack's folder.")) -> None:
    """Stop a detached stack started from the same folder."""
    if Stack(root=root).down():
        typer.echo("stack stopped")
    else:
        typer.echo("no running stack found")


@stack_app.command("status")
def status_command(root: Path = typer.Option(Path(".stack"), help="The stack's folder.")) -> None:
    """Print the running stack's URLs, which of its processes are alive, and the process groups
    left running by a process that died (`lmctl stack down` stops them)."""
    state = StackState.load(root.resolve())
    if state is None:
        typer.echo("no stack state found")
        raise typer.Exit(1)
    running = state.running()
    typer.echo(json.dumps({
        "api_url": state.api_url, "mlflow_url": state.mlflow_url, "redis_url": state.redis_url,
        "ready": state.ready,
        "alive": {name: name in running for name in state.pids},
        "left_behind": state.left_behind(),
    }, indent=2))  # fmt: skip
