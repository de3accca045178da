"""How a benchmark JSON was made: the command line that reproduces it and the environment
switches that change its results, recorded the same way by every scripts/bench_*.py.

`command` is the script's path from the repository root and its arguments exactly as given
(`--out` included), shell-quoted, so that it reruns the same measurement from the root.
`env` holds the variables lmcore reads (LMCORE_*), the thread counts, and any of the BLAS and
oneDNN switches that pick other kernels; a variable that is not set is recorded as null.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Always recorded (null when unset): lmcore's own switches and the thread count.
SWITCHES = ("LMCORE_ONEDNN_LINEAR", "LMCORE_INT8PACK", "OMP_NUM_THREADS")
# Recorded when set: anything else of lmcore's, and the libraries' kernel and thread switches.
PREFIXES = ("LMCORE_", "OMP_", "MKL_", "DNNL_", "ONEDNN_", "ATEN_CPU_CAPABILITY", "KMP_")


def command(script: str | Path, argv: list[str] | None) -> str:
    """`python scripts/<name>.py ARGS`: argv as main() got it, or the process's own arguments
    when main() was called with None (run as a script)."""
    path = Path(script).resolve()
    try:
        shown = str(path.relative_to(ROOT))
    except ValueError:
        shown = str(path)
    args = sys.argv[1:] if argv is None else list(argv)
    return "python " + " ".join(shlex.quote(a) for a in [shown, *args])


def env() -> dict[str, str | None]:
    names = set(SWITCHES) | {k for k in os.environ if k.startswith(PREFIXES)}
    return {name: os.environ.get(name) for name in sorted(names)}


def provenance(script: str | Path, argv: list[str] | None) -> dict[str, Any]:
    """{"command": ..., "env": ...} for a report to merge in."""
    return {"command": command(script, argv), "env": env()}
