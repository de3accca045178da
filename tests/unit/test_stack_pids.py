"""services.stack's pid checks: a recorded pid counts only while its start time still matches.

Real short-lived processes; Linux only (/proc), as the checks themselves.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from services.stack import _is_ours, _start_ticks

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")]  # fmt: skip


def test_a_pid_is_ours_only_with_the_start_time_it_had(tmp_path: Path) -> None:
    # A name with ") " in it: /proc/PID/stat must be split after the last parenthesis.
    odd = tmp_path / "a) b ("
    shutil.copy(shutil.which("sleep") or "/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "30"])
    try:
        ticks = _start_ticks(proc.pid)
        assert ticks is not None
        assert _is_ours(proc.pid, ticks)
        assert not _is_ours(proc.pid, ticks - 1)  # another process that got the same pid
        assert not _is_ours(proc.pid, None)  # a state.json that recorded no start time
    finally:
        proc.kill()
        proc.wait()
    assert not _is_ours(proc.pid, ticks)
