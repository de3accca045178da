"""Tracking URIs: scoped MLflow URIs, redacted credentials, the tracker's HTTP bounds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmcore.mlflow_client import (
    InvalidModelUriError,
    ModelNotFoundError,
    _mlflow_uris,
    redact_uri,
)
from lmcore.model_uri import parse_model_uri, resolve_model_uri
from lmcore.tracking import TRACKER_HTTP_DEFAULTS, MlflowTracker

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


@pytest.mark.parametrize(
    "text", ["models://llm@production", "models:/llm@production", "runs://abc123@x/model",
             "error: models://llm@prod.uction not found on sqlite:///mlflow.db"],
)
def test_redact_uri_leaves_model_uris_alone(text: str) -> None:
    assert redact_uri(text) == text  # `name@alias` is a model and its alias, not a user


def test_redact_uri_hides_the_credentials_of_a_server_uri_beside_a_model_uri() -> None:
    text = "models://llm@prod not found on https://alice:s3@cr3t@mlflow.example.com/x"
    assert redact_uri(text) == "models://llm@prod not found on https://***@mlflow.example.com/x"


def test_tracker_http_bounds_are_set_before_its_first_call_and_never_removed(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    for key in TRACKER_HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.client.search_experiments()  # a real call through the tracker's client
    tracker.start_run(run_name="bounds")
    tracker.end_run()
    # Left in place: removing them after each call raced with threads copying the environment.
    assert {key: os.environ.get(key) for key in TRACKER_HTTP_DEFAULTS} == TRACKER_HTTP_DEFAULTS


def test_the_users_own_mlflow_http_settings_win(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}").client.search_experiments()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == TRACKER_HTTP_DEFAULTS[
        "MLFLOW_HTTP_REQUEST_TIMEOUT"]


@pytest.mark.parametrize(
    "uri",
    ["models:/..@production", "models:/.@production", "models:/../1", "models://..//1",
     "runs:/RUN/model/../../..", "runs:/RUN/../../victim", "runs:/RUN/./model",
     "runs:/RUN/model//x", "runs:/../model", "runs:/./model", "runs:/RUN.x/model",
     "models:/m-../", "models:/m-a.b"],
)
def test_parse_model_uri_refuses_dot_segments(uri: str) -> None:
    # Names, run ids and artifact paths become directories of the model cache: `..` would put
    # them (and the sweep and rmtree of stale entries) outside it. The worker stops on this.
    with pytest.raises(InvalidModelUriError):
        parse_model_uri(uri)


@pytest.mark.parametrize(
    ("uri", "parts"),
    [("models:/my.model@production", ("my.model", "production", None)),
     ("models:/llm..v2/3", ("llm..v2", None, "3")),
     ("runs:/0123abcd_-ef/model/sub.dir/x", ("0123abcd_-ef", "model/sub.dir/x"))],
)
def test_names_and_paths_with_dots_inside_still_parse(uri: str, parts: tuple) -> None:
    parsed = parse_model_uri(uri)
    assert parsed is not None
    if parsed.run_id:
        assert (parsed.run_id, parsed.path) == parts
    else:
        assert (parsed.name, parsed.alias, parsed.version) == parts


@pytest.mark.parametrize("scheme", ["", "file://"], ids=["path", "file-uri"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_model_dirs_config_or_weights_file_resolves_to_that_dir(
    tmp_path: Path, name: str, scheme: str
) -> None:
    """load_model_dir takes either file for its dir; the resolver said "DIR/config.json is not
    a model dir (no config.json)", so LLM_MODEL_URI=DIR/config.json never loaded."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"")
    (model_dir / "tokenizer.json").write_text("{}")
    assert resolve_model_uri(f"{scheme}{model_dir / name}").path == model_dir.resolve()
    with pytest.raises(ModelNotFoundError, match="is not a model dir"):
        resolve_model_uri(f"{scheme}{model_dir / 'tokenizer.json'}")  # not one that names it
