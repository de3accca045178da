"""Pointing MLflow at a store for one call must not leak into the rest of the process."""

from __future__ import annotations

import os

import pytest

from lmcore.tracking import _mlflow_uris

pytestmark = pytest.mark.unit


def test_scoped_mlflow_uris_leave_the_environment_as_they_found_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:///kept.db")
    inside = f"sqlite:///{tmp_path / 'scoped.db'}"
    with _mlflow_uris(inside):
        assert mlflow.get_tracking_uri() == inside
    # MLflow's setters export these variables for subprocesses; the scope must undo that.
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert os.environ["MLFLOW_REGISTRY_URI"] == "sqlite:///kept.db"
    assert mlflow.get_tracking_uri() != inside
