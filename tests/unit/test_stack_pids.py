"""services.common.processes' pid checks (the stack's): a recorded pid counts only while its
start time still matches.

Real short-lived processes; Linux only (/proc), as the checks themselves.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from services.common.processes import is_ours, start_ticks

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")]  # fmt: skip


def test_a_pid_is_ours_only_with_the_start_time_it_had(tmp_path: Path) -> None:
    # A name with ") " in it: /proc/PID/stat must be split after the last parenthesis.
    odd = tmp_path / "a) b ("
    shutil.copy(shutil.which("sleep") or "/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "30"])
    try:
        ticks = start_ticks(proc.pid)
        assert ticks is not None
        assert is_ours(proc.pid, ticks)
        assert not is_ours(proc.pid, ticks - 1)  # another process that got the same pid
        assert not is_ours(proc.pid, None)  # a state.json that recorded no start time
    finally:
        proc.kill()
        proc.wait()
    assert not is_ours(proc.pid, ticks)
