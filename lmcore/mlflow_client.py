"""Reaching an MLflow server: the client for a tracking URI, and its errors as one line.

Shared by run logging, the registry and model URI resolution: it logs no run, changes no registry
and downloads nothing; mlflow is imported only inside functions (lmcore's import rule).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # a local file when MLFLOW_TRACKING_URI is unset
# What a logged model looks like in MLflow: the tracker writes it, the URI resolver reads it.
MODEL_ARTIFACT = "model"  # the pyfunc's name in its run: runs:/RUN_ID/model
MODEL_CONFIG_FILE = "config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"


# `scheme://user:password@host`: requests sends URL userinfo as basic auth, so a tracking URI
# may carry credentials. Greedy up to the host, so a password holding '@' goes too. Not in a
# model URI: `models://llm@production` names a model and its alias, never a user.
_USERINFO = re.compile(r"(?P<scheme>\b(?!(?:models|runs)://)[A-Za-z][\w+.-]*://)[^/\s?#]*@")


def redact_uri(text: str) -> str:
    """`https://alice:s3cr3t@mlflow.example.com` -> `https://***@mlflow.example.com`, in a URI
    or in any text holding URIs (an exception's message). For everything that is shown, logged
    or stored (params, metadata, cache paths); connections use the URI whole."""
    return _USERINFO.sub(r"\g<scheme>***@", str(text))


class TrackingError(RuntimeError):
    """The tracking server or registry refused or could not be reached; one readable line
    (credentials in the URIs it names are redacted)."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(redact_uri(str(message)), *args)


class ModelNotFoundError(TrackingError, LookupError):
    """A model URI names nothing: unknown path, model, version, alias or run."""


class InvalidModelUriError(TrackingError, ValueError):
    """A models:/ or runs:/ URI that is malformed: no change in the registry can make it load."""


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _client(tracking_uri: str | None = None) -> tuple[Any, str]:
    """An MlflowClient for the URI; TrackingError if MLflow cannot use it (an unknown scheme)."""
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri), uri
    except Exception as exc:
        raise TrackingError(f"cannot use tracking URI {uri!r}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = redact_uri(" ".join(str(exc).split()))
    return text[:limit] + ("..." if len(text) > limit else "")


def _http_status(exc: BaseException) -> int | None:
    from mlflow.exceptions import MlflowException

    return exc.get_http_status_code() if isinstance(exc, MlflowException) else None


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: unreachable, timeouts, 5xx, 429. A 4xx is the request's own fault."""
    status = _http_status(exc)
    if status is not None:
        return not 400 <= status < 500 or status in (408, 429)
    return isinstance(exc, OSError | TimeoutError)  # requests' errors derive from OSError


def _is_not_found(exc: BaseException) -> bool:
    # A missing alias comes back as 400 INVALID_PARAMETER_VALUE "... alias x not found."
    return _http_status(exc) == 404 or "not found" in str(exc).lower()


def _tracking_error(action: str, uri: str, exc: BaseException) -> TrackingError:
    if _is_transient(exc):
        return TrackingError(f"cannot {action}: MLflow at {uri} unreachable ({_one_line(exc)})")
    return TrackingError(f"cannot {action}: {_one_line(exc)}")


@contextmanager
def _mlflow_uris(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs at `uri` for a fluent-API call.

    Restores the previous *unset* state too, so a later MLFLOW_TRACKING_URI still wins.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_tracking = tracking_utils._tracking_uri
    old_registry = registry_utils._registry_uri
    # set_tracking_uri also exports MLFLOW_TRACKING_URI (for subprocesses): restore that too.
    old_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri = old_tracking
        registry_utils._registry_uri = old_registry
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
