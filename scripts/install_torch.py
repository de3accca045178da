"""Install the pinned torch here; never a multi-GB CUDA build on a machine without an NVIDIA GPU.

PyPI's torch wheels for Linux x86_64 are CUDA builds that pull several GB of nvidia-* packages.
So before installing, this asks pip what `pip install torch==VERSION` would bring (a dry run with
a JSON report). If that is a CUDA build and the machine has no NVIDIA GPU, torch comes from
PyTorch's CPU index instead; anything else (a CPU wheel pip finds on disk, macOS, a GPU machine)
installs as pip chose. Used by `make setup`; stdlib only, it runs before anything is installed.

    python scripts/install_torch.py 2.13.0              # install (or keep) torch 2.13.0
    python scripts/install_torch.py 2.13.0 --plan       # print the decision, install nothing
    TORCH_PIP_ARGS="--index-url URL" python scripts/install_torch.py 2.13.0   # your own source

The TORCH_PIP_ARGS that installed torch are recorded in the environment (`.torch-pip-args`), so
the same release asked for from another source is installed again from it (a CPU build
replaced by a CUDA one), not kept because its version number matches.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What PyPI's CUDA build of torch 2.13 pulled in (seen in a dry run): nvidia-cudnn-cu13,
# nvidia-cublas, ..., triton, cuda-bindings, cuda-toolkit.
CUDA_PACKAGE_PREFIXES = ("nvidia-", "triton", "cuda-")


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def same_release(installed: str, wanted: str) -> bool:
    """2.13.0+cpu is the release 2.13.0 (pip's == ignores the local label too)."""
    return installed.split("+", 1)[0] == wanted


def has_nvidia_gpu() -> bool:
    driver_gpus = Path("/proc/driver/nvidia/gpus")  # one folder per GPU the driver sees
    if driver_gpus.is_dir() and any(driver_gpus.iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def cuda_packages(report: dict[str, Any]) -> list[str]:
    """What in `pip install --report` marks a CUDA build: nvidia-*, triton, cuda-*, a +cu torch."""
    found = []
    for item in report.get("install", []):
        meta = item.get("metadata", {})
        name, version = meta.get("name", "").lower(), meta.get("version", "")
        if name.startswith(CUDA_PACKAGE_PREFIXES) or (name == "torch" and "+cu" in version):
            found.append(f"{name}=={version}")
    return found


def choose_source(report: dict[str, Any], gpu: bool) -> str:
    """"default" (install what pip picked) or "cpu-index" (PyTorch's CPU wheels)."""
    return "cpu-index" if cuda_packages(report) and not gpu else "default"


def record_path() -> Path:
    return Path(sys.prefix) / ".torch-pip-args"


def recorded_pip_args(record: Path) -> str:
    """The TORCH_PIP_ARGS torch was installed with here ("" for pip's own choice, or unknown)."""
    try:
        return record.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def dry_run_report(requirement: str) -> dict[str, Any]:
    """pip's JSON report of installing `requirement` into an environment without torch."""
    done = subprocess.run(
        pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-", requirement),
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"install_torch: pip cannot find {requirement}:\n{done.stderr.strip()}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="the torch release to install, e.g. 2.13.0")
    parser.add_argument("--plan", action="store_true", help="print the decision, install nothing")
    parser.add_argument("--record", type=Path, default=None,
                        help="where the source torch came from is recorded (default: in the "
                        "environment)")  # fmt: skip
    args = parser.parse_args(argv)
    requirement = f"torch=={args.version}"
    extra = shlex.split(os.environ.get("TORCH_PIP_ARGS", ""))
    record = args.record or record_path()
    source_args = shlex.join(extra)

    current = installed_version()
    reinstall: list[str] = []
    if current is not None and same_release(current, args.version):
        if recorded_pip_args(record) == source_args:
            print(f"install_torch: torch {current} is already installed")
            return 0
        # pip keeps an installed release that satisfies ==VERSION whatever the source asked for.
        reinstall = ["--force-reinstall"]
    if extra:
        command = pip("install", "-q", *reinstall, requirement, *extra)
        why = "TORCH_PIP_ARGS given"
    else:
        report = dry_run_report(requirement)
        gpu = has_nvidia_gpu()
        source = choose_source(report, gpu)
        if source == "cpu-index":
            cuda = ", ".join(cuda_packages(report)[:3])
            command = pip("install", "-q", *reinstall, requirement, "--index-url", CPU_INDEX)
            why = f"no NVIDIA GPU here, and the default source brings a CUDA build ({cuda}, ...)"
        else:
            command = pip("install", "-q", *reinstall, requirement)
            why = "NVIDIA GPU present" if gpu else "the default source has a CPU build"
    if reinstall:
        why += f"; torch {current} came from another source"
    print(f"install_torch: pip {' '.join(command[3:])}  ({why})")
    if args.plan:
        return 0
    returncode = subprocess.run(command).returncode
    if returncode == 0:
        record.write_text(source_args + "\n", encoding="utf-8")
    return returncode


if __name__ == "__main__":
    sys.exit(main())
