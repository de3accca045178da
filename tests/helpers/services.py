"""Worker and API processes for integration tests: real Celery workers and uvicorn on free ports.

Each helper starts its own subprocess (own session) and stops only that process; it also builds
the tiny model dirs the services load (tokenizer trained on a short text, saved with lmcore).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")

TOKENIZER_TEXT = """\
First Citizen: Before we proceed any further, hear me speak.
All: Speak, speak.
First Citizen: You are all resolved rather to die than to famish?
All: Resolved. resolved.
First Citizen: First, you know Caius Marcius is chief enemy to the people.
All: We know't, we know't.
First Citizen: Let us kill him, and we'll have corn at our own price. Is't a verdict?
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.05,
    message: str = "condition",
) -> T:  # fmt: skip
    """Poll condition() until it returns something truthy; its value, or TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} not met after {timeout_s} s")
        time.sleep(interval_s)


def start_all(workers: list[WorkerProcess], redis_url: str) -> None:
    """Spawn several workers at once (imports overlap), then wait for each heartbeat."""
    for worker in workers:
        worker.spawn()
    for worker in workers:
        worker.wait_ready(redis_url)


def make_model_dir(
    path: Path, *, seed: int = 0, block_size: int = 128, metadata: dict[str, Any] | None = None
) -> Path:
    """A tiny random (context-sensitive) model with a real tokenizer, saved as a model dir."""
    from lmcore.checkpoint import save_model_dir
    from lmcore.tokenizer import Tokenizer
    from tests.helpers.models import context_sensitive_model

    tokenizer = Tokenizer.train([TOKENIZER_TEXT] * 4, vocab_size=320)
    model = context_sensitive_model(seed, vocab_size=tokenizer.vocab_size, block_size=block_size)
    return save_model_dir(path, model, tokenizer, metadata or {"name": "tiny", "version": "1"})


def service_env(redis_url: str, model_uri: str | Path, **overrides: Any) -> dict[str, str]:
    """Environment for a worker or API subprocess: test Redis, test model, one BLAS thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update({
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "LLM_REDIS_URL": redis_url,
        "LLM_MODEL_URI": str(model_uri),
        "LLM_HEARTBEAT_S": "1",
        "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class _Process:
    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = env
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def spawn(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.alive:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _check_alive(self) -> None:
        if not self.alive:
            raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")


class WorkerProcess(_Process):
    """`celery -A services.worker.celery_app:app worker --pool threads` as a subprocess."""

    def __init__(
        self, name: str, env: dict[str, str], log_dir: Path, *, concurrency: int = 8,
        pool: str = "threads",
    ) -> None:  # fmt: skip
        super().__init__(name, env, log_dir)
        self.concurrency = concurrency
        self.pool = pool
        self.nodename = f"{name}@{socket.gethostname()}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "services.worker.celery_app:app", "worker",
            "--pool", self.pool, "--concurrency", str(self.concurrency), "-n", self.nodename,
            "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        ]  # fmt: skip

    def start(self, redis_url: str, timeout_s: float = 120.0) -> WorkerProcess:
        """Spawn and wait for its heartbeat (model loaded, engine running)."""
        self.spawn()
        return self.wait_ready(redis_url, timeout_s)

    def wait_ready(self, redis_url: str, timeout_s: float = 120.0) -> WorkerProcess:
        import redis

        client = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            def beating() -> bool:
                self._check_alive()
                try:
                    return bool(client.exists(f"llm:workers:{self.nodename}"))
                except redis.ConnectionError:
                    return False

            wait_until(beating, timeout_s, 0.1, f"heartbeat of {self.nodename}")
        finally:
            client.close()
        return self


class ApiProcess(_Process):
    """`uvicorn services.api.app:create_app --factory` on a free port."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, port: int | None = None):
        super().__init__(name, env, log_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "uvicorn", "services.api.app:create_app", "--factory",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
        ]  # fmt: skip

    def start(self, timeout_s: float = 60.0) -> ApiProcess:
        self.spawn()
        return self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 60.0) -> ApiProcess:
        def healthy() -> bool:
            self._check_alive()
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout_s, 0.1, f"{self.name} /healthz")
        return self


@contextlib.contextmanager
def api_without_workers(root: Path, **redis_options: Any) -> Iterator[tuple[Any, ApiProcess]]:
    """A private Redis and an API process over it (no worker, no model: jobs stay queued),
    both stopped afterwards."""
    from tests.helpers.redis_server import RedisServer

    redis = RedisServer(root / "redis", **redis_options)
    redis.start()
    api = ApiProcess("api", service_env(redis.url, root / "no-model"), root / "logs")
    try:
        api.start()
        yield redis, api
    finally:
        api.stop()
        redis.stop()


def read_sse(response: httpx.Response) -> list[dict[str, Any]]:
    """Parse a whole text/event-stream body into [{id, event, data}] (data JSON-decoded)."""
    events = []
    for event in iter_sse(response.iter_lines()):
        events.append(event)
        if event["event"] == "done":
            break
    return events


def iter_sse(lines: Any) -> Any:
    current: dict[str, Any] = {}
    for line in lines:
        if not line:
            if "data" in current:
                current.setdefault("event", "message")
                current["data"] = json.loads(current["data"])
                yield current
            current = {}
            continue
        if line.startswith(":"):
            continue  # comment / ping
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            current["data"] = current.get("data", "") + value
        elif field in ("id", "event"):
            current[field] = value
