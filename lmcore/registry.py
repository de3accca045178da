"""The MLflow model registry: promote a version to an alias, read what an alias points at, and
register a run's model so that a retried registration leaves one version.

It logs no run and downloads no model; mlflow is imported only inside functions (lmcore's import
rule).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmcore.mlflow_client import (
    ModelNotFoundError,
    TrackingError,
    _client,
    _is_not_found,
    _one_line,
    _tracking_error,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "llm"


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str | None
    version: str | None
    run_id: str | None
    uri: str


def promote(
    name: str, version: str | int, alias: str = "production", tracking_uri: str | None = None
) -> None:
    """Point `alias` at an existing version (the serving worker picks it up on its next poll)."""
    client, uri = _client(tracking_uri)
    version = str(version)
    if not version.isdigit():
        raise TrackingError(f"model version must be a positive integer, got {version!r}")
    try:
        client.get_model_version(name, version)
    except Exception as exc:
        if _is_not_found(exc):
            raise ModelNotFoundError(f"model version {name}/{version} not found on {uri}") from exc
        raise _tracking_error(f"promote {name}/{version}", uri, exc) from exc
    try:
        client.set_registered_model_alias(name, alias, version)
    except Exception as exc:
        raise _tracking_error(f"set alias {alias!r} on {name}/{version}", uri, exc) from exc


def current_version(
    name: str, alias: str, tracking_uri: str | None = None
) -> ModelVersionInfo | None:
    """The version `alias` points at, or None if the model or alias does not exist (yet)."""
    client, uri = _client(tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except Exception as exc:
        if _is_not_found(exc):
            return None
        raise _tracking_error(f"look up {name}@{alias}", uri, exc) from exc
    return ModelVersionInfo(name, str(mv.version), mv.run_id, f"models:/{name}/{mv.version}")


# -- registering a run's model (MlflowTracker.log_model_dir), retried while MLflow is down --


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _versions_from(client: Any, name: str, run_id: str | None, source: str) -> list[Any]:
    """The versions of model `name` registered from `source` by `run_id`, oldest first."""
    found = client.search_model_versions(f"run_id = '{run_id}'")
    mine = [v for v in found if v.name == name and v.source == source]
    return sorted(mine, key=lambda v: int(v.version))


def _delete_duplicates(client: Any, duplicates: Sequence[Any]) -> None:
    for mv in duplicates:
        try:
            client.delete_model_version(mv.name, mv.version)
            log.warning("deleted %s version %s: a duplicate left by a retried registration",
                        mv.name, mv.version)  # fmt: skip
        except Exception as exc:
            log.warning("could not delete duplicate %s version %s: %s", mv.name, mv.version,
                        _one_line(exc))  # fmt: skip
