"""One training run per checkpoint dir: an advisory lock on `<checkpoint_dir>/.lock`.

Two runs writing one dir prune each other's checkpoints and resume each other's steps. Rank 0
holds the lock for the whole run; the kernel drops it when the process dies, however it dies,
so no stale lock is left behind locally. On NFS the server keeps a dead client's lock until its
lease runs out (about 90 s), which is what a pod rescheduled after a node failure meets: the
run waits a while for the lock before it gives up. Storage without locks (some FUSE mounts)
gets a warning and an unlocked run, as before the lock existed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class CheckpointDirBusy(RuntimeError):
    """Another run holds the checkpoint dir's lock."""


class LockWaitStopped(CheckpointDirBusy):
    """The run was told to stop (SIGTERM) while it waited for the lock."""


class CheckpointDirLock:
    """The held lock; `release()` (or the process's end) lets the next run in."""

    def __init__(self, fd: int | None, path: Path) -> None:
        self._fd, self.path = fd, path

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock; the file stays (see lock_checkpoint_dir)
            self._fd = None


def lock_checkpoint_dir(
    ckpt_dir: str | os.PathLike[str], wait_s: float, poll_s: float = 1.0,
    stop: threading.Event | None = None,
) -> CheckpointDirLock:  # fmt: skip
    """Lock `ckpt_dir` for this run, waiting up to `wait_s` for a run that holds it, or until
    `stop` is set (SIGTERM: LockWaitStopped, at once rather than at the wait's end).

    The lock file is never deleted: a run that unlinked it could lose a race with one that had
    just opened it, and two runs would each hold a lock on a different file.
    """
    path = Path(ckpt_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline, waiting = time.monotonic() + wait_s, False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(path)
                if time.monotonic() >= deadline:
                    raise CheckpointDirBusy(
                        f"checkpoint_dir {ckpt_dir} is in use by another training run "
                        f"({holder}); waited {wait_s:.0f} s. Give this run its own "
                        "train.checkpoint_dir, or stop the other one"
                    ) from None
                if not waiting:
                    log.warning("checkpoint_dir %s is locked by another run (%s): waiting up "
                                "to %.0f s for it", ckpt_dir, holder, wait_s)
                    waiting = True
                if _stopped_during(poll_s, stop):
                    raise LockWaitStopped(f"stopped while waiting for checkpoint_dir "
                                          f"{ckpt_dir}, locked by another run ({holder})")
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, BlockingIOError) or exc.errno not in _NO_LOCKS:
            raise
        log.warning("checkpoint_dir %s cannot be locked (%s): nothing stops a second run from "
                    "writing to it", ckpt_dir, exc.strerror)
        return CheckpointDirLock(None, path)
    except BaseException:
        os.close(fd)
        raise
    # Who holds it, for the message a second run prints (advisory: the flock is the lock).
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return CheckpointDirLock(fd, path)


def _stopped_during(seconds: float, stop: threading.Event | None) -> bool:
    if stop is None:
        time.sleep(seconds)
        return False
    return stop.wait(seconds)


def _holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text())
        return f"pid {record['pid']} on {record['host']} since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
