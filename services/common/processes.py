"""Local processes and ports: is a recorded pid still that process, does its group still run,
stop the group, pick a free port (Linux /proc; the pid alone where there is none).

Knows nothing of what the processes are (callers pass their env marker and timeouts); it must
not print.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

PROC = Path("/proc")
MAX_PORT = 65535


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; None if there is no such process."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # the name (field 2) may hold spaces and parentheses


def start_ticks(pid: int) -> int | None:
    """When pid started, in clock ticks after boot (field 22); None without /proc."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def is_ours(pid: int, ticks: int | None) -> bool:
    """pid is running and is still the process that started at `ticks` (start_ticks)."""
    if not PROC.is_dir():  # no /proc (macOS): the pid alone has to do
        return _alive(pid)
    fields = _stat(pid)
    return (fields is not None and fields[0] not in "ZX" and ticks is not None
            and int(fields[19]) == ticks)  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _group_alive(pgid: int) -> bool:
    """Any process of the group is still running. Zombies do not count: orphans re-parented to
    an init that never reaps them would otherwise keep the group alive forever."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not PROC.is_dir():
        return True
    for entry in PROC.iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields and int(fields[2]) == pgid and fields[0] not in "ZX":
            return True
    return False


def group_carries_env(pgid: int, name: str, value: str) -> bool:
    """A live process of group pgid has name=value in its environment (an empty value: never).
    A group id is not reused while any member lives, so such a group is the one that set it."""
    if not value or not PROC.is_dir():
        return False
    marker = f"{name}={value}".encode()
    for entry in PROC.iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if not fields or int(fields[2]) != pgid or fields[0] in "ZX":
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or another user's
            continue
        if marker in environ.split(b"\0"):
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def terminate_group(
    pgid: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """SIGTERM process group pgid, SIGKILL it if it still runs after timeout_s; proc, the
    group leader when it is our child, is reaped."""
    _signal_group(pgid, signal.SIGTERM)
    if not _group_gone(pgid, proc, timeout_s):
        _signal_group(pgid, signal.SIGKILL)
        _group_gone(pgid, proc, 5.0)
    if proc is not None:
        proc.wait()


def _group_gone(pgid: int, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None:
            proc.poll()  # reap our own child as it exits
        else:
            _alive(pgid)  # reaps it if it is our child after all
        if not _group_alive(pgid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str, preferred: int) -> int:
    """The preferred port if free, else the next free one above it (0 = any free port).

    ValueError if preferred is out of range or none of the hundred from it is free.
    """
    if not 0 <= preferred <= MAX_PORT:
        raise ValueError(f"port {preferred} is out of range (0..{MAX_PORT}; 0 = any free port)")
    if preferred == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return int(sock.getsockname()[1])
    last = min(preferred + 99, MAX_PORT)
    for port in range(preferred, last + 1):
        if _port_free(host, port):
            return port
    raise ValueError(f"no free port in {preferred}..{last}")
