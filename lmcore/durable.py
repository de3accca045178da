"""fsync helpers for files published by rename: the data must reach the disk before the name.

Without them a crash (power loss, a node going down) can leave a renamed-into-place checkpoint
or token cache complete-looking but empty or torn.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: a rename into it, a new file), where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_files_and_dir(path: Path) -> None:
    """fsync each file directly in `path`, then `path` itself."""
    for p in path.iterdir():
        if p.is_file():
            fsync_file(p)
    fsync_dir(path)
