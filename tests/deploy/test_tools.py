"""scripts/install_tools.sh (helm and kubectl into .tools/bin) and scripts/ci_tools.sh."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.deploy.conftest import INSTALL_TOOLS, REPO, TOOLS_BIN

pytestmark = pytest.mark.deploy


def _version(text: str) -> tuple[int, int]:
    m = re.search(r"v(\d+)\.(\d+)", text)
    assert m, text
    return int(m[1]), int(m[2])


def test_installed_helm_and_kubectl_are_recent(helm: str, kubectl: str) -> None:
    helm_version = subprocess.run(
        [helm, "version", "--short"], capture_output=True, text=True
    ).stdout
    assert _version(helm_version) >= (3, 14)
    kubectl_version = subprocess.run(
        [kubectl, "version", "--client"], capture_output=True, text=True
    ).stdout
    assert _version(kubectl_version) >= (1, 30)


def test_install_tools_is_idempotent(helm: str, kubectl: str) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in TOOLS_BIN.iterdir()}
    proc = subprocess.run(["bash", str(INSTALL_TOOLS)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(TOOLS_BIN)
    assert "already" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in TOOLS_BIN.iterdir()} == before


def test_tools_folder_is_gitignored() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", ".tools/bin/helm"], cwd=REPO)
    assert ignored.returncode == 0


def test_ci_tools_never_fails(helm: str) -> None:
    # Outside CI it only makes sure helm/kubectl are there; it must exit 0 whatever happens.
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "ci_tools.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "CI": "false"},
    )
    assert proc.returncode == 0, proc.stderr
