"""scripts/install_torch.py: no CUDA build of torch on a machine without an NVIDIA GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from scripts import install_torch

pytestmark = pytest.mark.unit

SCRIPT = Path(install_torch.__file__)


def _report(*packages: tuple[str, str]) -> dict:
    return {"install": [{"metadata": {"name": n, "version": v}} for n, v in packages]}


# The shape of what pip reported for PyPI's torch 2.13.0 on Linux x86_64 (trimmed).
PYPI_CUDA = _report(("torch", "2.13.0"), ("nvidia-cudnn-cu13", "9.20.0.48"), ("triton", "3.7.1"),
                    ("cuda-bindings", "13.5.0"), ("sympy", "1.14.0"))  # fmt: skip
LOCAL_CPU = _report(("torch", "2.13.0+cpu"), ("sympy", "1.14.0"), ("filelock", "4.3.1"))


def test_a_cuda_build_without_a_gpu_switches_to_the_cpu_index() -> None:
    assert install_torch.choose_source(PYPI_CUDA, gpu=False) == "cpu-index"
    assert install_torch.choose_source(_report(("torch", "2.13.0+cu128")), gpu=False) == (
        "cpu-index"
    )


def test_a_gpu_machine_or_a_cpu_build_installs_what_pip_chose() -> None:
    assert install_torch.choose_source(PYPI_CUDA, gpu=True) == "default"
    assert install_torch.choose_source(LOCAL_CPU, gpu=False) == "default"
    assert install_torch.cuda_packages(LOCAL_CPU) == []


def test_a_local_build_label_is_the_same_release() -> None:
    assert install_torch.same_release("2.13.0+cpu", "2.13.0")
    assert not install_torch.same_release("2.13.1", "2.13.0")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)  # fmt: skip


def test_the_installed_release_is_kept() -> None:
    import torch

    done = _run(torch.__version__.split("+")[0], "--plan")
    assert done.returncode == 0, done.stderr
    assert "already installed" in done.stdout


def test_torch_pip_args_name_the_source_and_skip_the_decision() -> None:
    done = _run("0.0.1", "--plan", env={"TORCH_PIP_ARGS": "--index-url https://example.invalid/s"})
    assert done.returncode == 0, done.stderr
    assert "torch==0.0.1 --index-url https://example.invalid/s" in done.stdout
    assert "TORCH_PIP_ARGS given" in done.stdout


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A minimal valid wheel: enough metadata for pip to resolve it."""
    dist = f"{name.replace('-', '_')}-{version}"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + meta,
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{path},,\n" for path in files) + (
        f"{dist}.dist-info/RECORD,,\n"
    )
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)


def _only_source(folder: Path) -> dict[str, str]:
    """Environment for pip to see no config, no index, and only the wheels in `folder`."""
    return {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(folder),
            "TORCH_PIP_ARGS": ""}  # fmt: skip


def test_pips_real_report_of_a_cuda_dependency_decides_the_source(tmp_path: Path) -> None:
    # A source whose "torch" needs an nvidia-* wheel, as PyPI's Linux build does; a release not
    # installed here, so the script asks pip instead of keeping the installed torch.
    _wheel(tmp_path, "torch", "0.0.2", ["nvidia-cublas==13.1.1"])
    _wheel(tmp_path, "nvidia-cublas", "13.1.1", [])
    done = _run("0.0.2", "--plan", env=_only_source(tmp_path))
    assert done.returncode == 0, done.stderr
    if install_torch.has_nvidia_gpu():
        assert "NVIDIA GPU present" in done.stdout and "--index-url" not in done.stdout
    else:
        assert f"--index-url {install_torch.CPU_INDEX}" in done.stdout
        assert "nvidia-cublas==13.1.1" in done.stdout


def test_a_cpu_build_from_the_default_source_is_installed_as_found(tmp_path: Path) -> None:
    _wheel(tmp_path, "torch", "0.0.4", [])
    done = _run("0.0.4", "--plan", env=_only_source(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "pip install -q torch==0.0.4  (" in done.stdout and "--index-url" not in done.stdout


def test_a_package_pip_cannot_find_is_a_message_and_a_non_zero_exit(tmp_path: Path) -> None:
    done = _run("0.0.3", "--plan", env=_only_source(tmp_path))
    assert done.returncode != 0
    assert "install_torch: pip cannot find torch==0.0.3" in done.stderr


def test_torch_from_another_source_is_installed_again_though_its_release_matches(
    tmp_path: Path,
) -> None:
    """`make test TORCH_PIP_ARGS="--index-url .../cu130"` on a venv holding the CPU build of the
    same release said "already installed" and kept the CPU build."""
    import torch

    release = torch.__version__.split("+")[0]
    record = tmp_path / "torch-pip-args"
    record.write_text("\n")  # installed from pip's own choice
    source = {"TORCH_PIP_ARGS": "--index-url https://example.invalid/cu130"}
    done = _run(release, "--plan", "--record", str(record), env=source)
    assert done.returncode == 0, done.stderr
    assert "already installed" not in done.stdout
    assert f"--force-reinstall torch=={release} --index-url https://example.invalid/cu130" in (
        done.stdout
    )
    record.write_text("--index-url https://example.invalid/cu130\n")  # installed from there
    kept = _run(release, "--plan", "--record", str(record), env=source)
    assert "already installed" in kept.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_setup_runs_again_when_the_torch_settings_change(tmp_path: Path) -> None:
    """Setup used to depend on pyproject.toml alone: a new TORCH_VERSION or TORCH_PIP_ARGS was
    silently ignored once .venv existed. The Makefile is the real one; the venv's python is a
    stand-in that logs what setup asked of it (nothing is installed)."""
    repo = SCRIPT.parents[1]
    shutil.copy(repo / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    fake_python = tmp_path / ".venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'asked.log'}\n")
    fake_python.chmod(0o755)

    def setup_runs(*variables: str) -> bool:
        log = tmp_path / "asked.log"
        log.unlink(missing_ok=True)
        done = subprocess.run(["make", "-s", "setup", f"PYTHON={sys.executable}", *variables],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return log.is_file() and "scripts/install_torch.py" in log.read_text()

    assert setup_runs()
    assert not setup_runs()  # nothing changed
    assert setup_runs("TORCH_PIP_ARGS=--index-url https://example.invalid/cu130")
    assert not setup_runs("TORCH_PIP_ARGS=--index-url https://example.invalid/cu130")
    assert setup_runs("TORCH_VERSION=2.12.0")
