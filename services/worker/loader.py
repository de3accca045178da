"""Resolves LLM_MODEL_URI (registry alias or version, run, local path) into a loaded model.

Loading only: it must not start engines or threads (the runtime does), and never unpickles.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmcore.checkpoint import CheckpointError, load_model_dir
from lmcore.config import ConfigError
from lmcore.inference_layout import ShapeChoice, describe
from lmcore.linear import gemm_library
from lmcore.mlflow_client import InvalidModelUriError, TrackingError  # mlflow only when used
from lmcore.model import Transformer
from lmcore.model_uri import (
    parse_model_uri,
    prune_model_cache,
    remember_alias_version,
    resolve_model_uri,
)
from lmcore.precision import inference_dtype, resolve_precision
from lmcore.tokenizer import Tokenizer
from services.common.jobs import ModelRef
from services.common.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AliasMatch:
    name: str
    alias: str


def alias_of(uri: str) -> AliasMatch | None:
    """The registered model and alias `uri` names, as the resolver reads it (one parser: a
    stricter pattern here once left the hot swap silently off for `models:/llm@production/`
    and `models://llm@production`, which load as that alias); None if it names no alias."""
    try:
        parsed = parse_model_uri(uri)
    except InvalidModelUriError:
        return None
    if parsed is None or parsed.alias is None or parsed.name is None:
        return None
    return AliasMatch(parsed.name, parsed.alias)


class FatalLoadError(ValueError):
    """The settings or the model dir must change before this worker can load: no retry helps."""


def cannot_fix_itself(uri: str, exc: BaseException) -> bool:
    """Whether loading `uri` failed for good (a bad path, model dir or setting), rather than for
    now (MLflow unreachable, no version under the alias yet)."""
    if isinstance(exc, CheckpointError) and "load it again" in str(exc):
        return False  # the dir was republished while being read: the next read sees one model
    if isinstance(exc, FatalLoadError | CheckpointError | ConfigError | InvalidModelUriError):
        return True  # a malformed models:/ or runs:/ URI included: the registry cannot fix it
    # Only models:/ and runs:/ ask MLflow, whose registry can change; anything else is a local
    # path that exists or not.
    return isinstance(exc, TrackingError) and not uri.startswith(("models:/", "runs:/"))


@dataclass
class ServingModel:
    model: Transformer
    tokenizer: Tokenizer
    ref: ModelRef
    path: Path
    layout: list[ShapeChoice] = field(default_factory=list)  # lmcore.inference_layout's choices

    @property
    def tokenizer_digest(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise FatalLoadError(f"LLM_DEVICE={setting}: this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise FatalLoadError(f"LLM_DEVICE={setting}: MPS is not available on this machine")
    return device


def load_serving_model(
    uri: str, settings: Settings, *, layout: list[ShapeChoice] | None = None
) -> ServingModel:
    """Download (cached) if needed, then load weights and tokenizer onto the configured device.

    `layout`: the serving model's linear layout, reused when the new model has the same linears
    (a hot swap then measures nothing while the engine runs).
    """
    try:
        parse_model_uri(uri)
    except InvalidModelUriError as exc:
        raise FatalLoadError(f"LLM_MODEL_URI={uri!r} is malformed: {exc}") from exc
    resolved = resolve_model_uri(
        uri, cache_dir=settings.model_cache_dir, tracking_uri=settings.mlflow_tracking_uri
    )
    if not settings.kv_cache:
        raise FatalLoadError(
            "LLM_KV_CACHE=false: the serving engine always decodes from its static KV cache "
            "(use `lmctl generate --no-kv-cache` to compare against full recompute)"
        )
    device = pick_device(settings.device)
    precision = resolve_precision(settings.mixed_precision, device)
    # Cast and quantize before the layout is measured, so that it is measured for what serves.
    loaded = load_model_dir(resolved.path, device=device, dtype=inference_dtype(precision),
                            quantized=settings.quantized, layout=layout)  # fmt: skip
    if loaded.tokenizer is None:
        raise FatalLoadError(f"{resolved.path} has no tokenizer.json; the worker needs one")
    meta = loaded.metadata
    ref = ModelRef(
        name=resolved.name or meta.get("name") or resolved.path.name,
        version=resolved.version or _str_or_none(meta.get("version")),
        run_id=resolved.run_id or _str_or_none(meta.get("run_id")),
        uri=uri,
    )
    kept = " (kept from the serving model)" if layout and loaded.layout == layout else ""
    gemms = f"; CPU GEMMs: {gemm_library()}" if loaded.model.device.type == "cpu" else ""
    log.info("loaded %s (version %s) from %s on %s, %s%s%s; one-row linears: %s%s", ref.name,
             ref.version, resolved.path, loaded.model.device, precision.name,
             ", int8" if settings.quantized else "", gemms, describe(loaded.layout),
             kept)  # fmt: skip
    return ServingModel(loaded.model, loaded.tokenizer, ref, resolved.path, loaded.layout)


def tidy_model_cache(
    settings: Settings, serving: ServingModel, previous: ServingModel | None,
    alias_uri: str | None = None,
) -> None:
    """After a hot swap: record that `alias_uri` now names the serving version (the outage
    fallback loads it on a restart), then remove the cached models other than the serving one
    and the one it replaced (a rollback loads that without a download). Without this each
    promotion added a version to the cache until the pod's emptyDir limit evicted it. Never
    raises: a cache that cannot be tidied only takes more room."""
    cache, tracking = settings.model_cache_dir, settings.mlflow_tracking_uri
    try:
        if alias_uri and serving.ref.version:
            remember_alias_version(alias_uri, serving.ref.version, cache, tracking)
        keep = [serving.path] + ([previous.path] if previous is not None else [])
        pruned = prune_model_cache(cache, keep)
    except Exception as exc:
        log.warning("could not tidy the model cache after the swap (it keeps older versions): "
                    "%s: %s", type(exc).__name__, exc)  # fmt: skip
        return
    if pruned:
        freed = sum(p.size for p in pruned)
        log.info("model cache: removed %d older model(s), %.1f MB freed: %s", len(pruned),
                 freed / 1e6, ", ".join(str(p.path) for p in pruned))  # fmt: skip


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)
