"""pyproject.toml's declared dependency floors against what the code needs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
# The lowest MLflow that tests/integration/test_tracking.py and test_cli_mlflow.py pass against.
# lmcore publishes and resolves MLflow 3 logged models (create_logged_model, log_outputs,
# search_logged_models), which 2.x lacks. Below 3.7 MlflowClient.log_artifact ignores the
# client's tracking URI for mlflow-artifacts:/ runs (uploads are dropped); below 3.9 a sqlite
# store creates ./mlruns in the working dir and fails to import under SQLAlchemy 2.1.
MLFLOW_FLOOR = Version("3.9")
MLFLOW_PACKAGES = {"mlflow", "mlflow-skinny"}


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines]


def _lower_bound(req: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", ">", "==", "~=")]
    return max(bounds, default=None)


def test_mlflow_floor_has_the_logged_model_api() -> None:
    mlflow_reqs = [r for r in _requirements() if r.name in MLFLOW_PACKAGES]
    assert {r.name for r in mlflow_reqs} == MLFLOW_PACKAGES
    for req in mlflow_reqs:
        bound = _lower_bound(req)
        assert bound is not None and bound >= MLFLOW_FLOOR, (
            f"{req}: lmcore's tracking does not work on MLflow below {MLFLOW_FLOOR}")
