"""A real `mlflow server` (SQLite backend, local artifacts) on a free port, for integration tests.

Starts and stops only the process group it launched; it must not mock MLflow or touch other servers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The venv's own mlflow, so tests never pick up another install from PATH.
MLFLOW_BIN = Path(sys.executable).with_name("mlflow")
MLFLOW_CMD = [str(MLFLOW_BIN)] if MLFLOW_BIN.exists() else [sys.executable, "-m", "mlflow"]
START_TIMEOUT_S = 180.0  # importing mlflow alone takes ~10 s on two busy cores


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_healthy(uri: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class MlflowServer:
    """One server over a fixed root dir and port: stop() and start() again keep its data."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "mlflow-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            *MLFLOW_CMD,
            "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip

    def start(self, timeout_s: float = START_TIMEOUT_S) -> str:
        assert self._proc is None, "server already running"
        # No background job runner (a dozen huey processes): tests never use MLflow jobs.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with self.log_path.open("ab") as log:
            # Own process group: stop() ends the server and its uvicorn workers, nothing else.
            self._proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=self.root, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not is_healthy(self.uri):
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"mlflow server exited early; see {self.log_path}:\n"
                                   + self.log_tail())
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"mlflow server not healthy after {timeout_s:.0f} s:\n"
                                   + self.log_tail())
            time.sleep(0.2)
        return self.uri

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=timeout_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self._wait_port_free()

    def kill(self) -> None:
        """Die abruptly (SIGKILL), as a crashed or partitioned server would."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            self._wait_port_free()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _wait_port_free(self, timeout_s: float = 20.0) -> None:
        # Children of the group may hold the socket a moment longer than the leader.
        deadline = time.monotonic() + timeout_s
        while is_healthy(self.uri, timeout_s=0.5) and time.monotonic() < deadline:
            time.sleep(0.1)


@contextmanager
def mlflow_server(root: Path, port: int | None = None) -> Iterator[str]:
    """`with mlflow_server(tmp_path) as uri:` a healthy server for the block, stopped after."""
    server = MlflowServer(root, port)
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


@contextmanager
def running_server(root: Path, port: int | None = None) -> Iterator[MlflowServer]:
    """Like mlflow_server, but yields the MlflowServer so a test can stop and restart it."""
    server = MlflowServer(root, port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
