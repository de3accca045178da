"""Model URIs to local model dirs: parse models:/ and runs:/ URIs, resolve them against MLflow,
and keep what they download in a local cache that processes share safely.

It writes nothing to MLflow, and nothing a URI holds or the registry answers may lead it outside
its cache; mlflow is imported only inside functions (lmcore's import rule).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcore.mlflow_client import (
    _USERINFO,
    MODEL_ARTIFACT,
    MODEL_CONFIG_FILE,
    MODEL_WEIGHTS_FILE,
    InvalidModelUriError,
    ModelNotFoundError,
    TrackingError,
    _client,
    _http_status,
    _is_not_found,
    _is_transient,
    _one_line,
    _tracking_error,
    default_tracking_uri,
    redact_uri,
)

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/llm-pipeline/models")
_CACHE_STAMP = ".llm-source.json"
# A cache download dir nothing has written to for this long was left by a crashed process.
ABANDONED_AFTER_S = 3600.0
# A cached model resolved or downloaded this recently may be loading in another process that
# shares the cache: prune_model_cache leaves it. Loads take seconds; promotions come hours apart.
RECENTLY_USED_S = 600.0


@dataclass(frozen=True)
class ModelUri:
    """A parsed model URI (parse_model_uri): exactly one of its forms is filled in."""

    uri: str  # as given, surrounding whitespace removed
    name: str | None = None  # models:/NAME@ALIAS, models:/NAME/VERSION
    alias: str | None = None
    version: str | None = None
    model_id: str | None = None  # models:/m-... (an MLflow 3 logged model)
    run_id: str | None = None  # runs:/RUN_ID[/PATH]
    path: str | None = None  # the path inside the run (default: the logged model `model`)


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local model dir: config.json + model.safetensors + tokenizer.json
    name: str | None
    version: str | None
    run_id: str | None
    uri: str


def find_model_dir(root: Path) -> Path | None:
    """The model dir at `root`, or inside a downloaded pyfunc (artifacts/<name>/config.json)."""
    if (root / MODEL_CONFIG_FILE).is_file():
        return root
    candidates = sorted(root.glob(f"artifacts/*/{MODEL_CONFIG_FILE}"))
    candidates += sorted(root.glob(f"*/artifacts/*/{MODEL_CONFIG_FILE}"))
    return candidates[0].parent if candidates else None


_ALIAS = re.compile(r"^[\w\-]+$")  # MLflow's own rule for alias names
# Run ids (hex) and logged model ids (m-hex): they name directories of the model cache.
_SAFE_ID = re.compile(r"^[A-Za-z0-9_\-]+$")
_VERSION = re.compile(r"^[0-9]+$")  # a registry version; str.isdigit() also takes "²" and "١"


def _bad_segment(segment: str) -> bool:
    # Each name and path segment is a directory of the model cache: "..", "." or "" would put
    # an entry (and the sweep and removal of stale ones) outside its place, or outside the cache.
    return segment in ("", ".", "..")


def parse_model_uri(uri: str) -> ModelUri | None:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/MODEL_ID`, `runs:/RUN_ID[/PATH]`
    -> their parts; None for anything else (a path). One parser for the resolver and the
    worker's alias watcher, so a URI that loads as an alias is watched as one. Extra slashes
    around the reference are allowed (`models://llm@production/`); a URI no registry could
    answer (no name, an empty alias, a version that is not a positive integer, no run id)
    raises InvalidModelUriError, as does one that could lead outside the model cache (a name
    or path segment `.`, `..` or empty, a run or model id not made of letters, digits, _, -).
    """
    text = str(uri).strip()
    if text.startswith("runs:/"):
        run_id, _, path = text.removeprefix("runs:/").strip("/").partition("/")
        if not run_id:
            raise InvalidModelUriError(f"{uri!r}: name a run (runs:/RUN_ID/{MODEL_ARTIFACT})")
        if not _SAFE_ID.match(run_id):
            raise InvalidModelUriError(f"{uri!r}: {run_id!r} is not a run id (letters, digits, "
                                       "_ and -)")  # fmt: skip
        if path and any(_bad_segment(part) for part in path.split("/")):
            raise InvalidModelUriError(f"{uri!r}: an artifact path has no '.', '..' or empty "
                                       f"segments (runs:/RUN_ID/{MODEL_ARTIFACT})")  # fmt: skip
        return ModelUri(text, run_id=run_id, path=path or MODEL_ARTIFACT)
    if not text.startswith("models:/"):
        return None
    ref = text.removeprefix("models:/").strip("/")
    if "@" in ref:
        name, _, alias = ref.rpartition("@")
        if not _ALIAS.match(alias):
            raise InvalidModelUriError(f"{uri!r}: {alias!r} is not an alias (letters, digits, _ "
                                       "and -: models:/NAME@ALIAS)")  # fmt: skip
    elif "/" in ref:
        name, _, version = ref.rpartition("/")
        if not (version.isdigit() and int(version) > 0):
            raise InvalidModelUriError(f"{uri!r}: a version is a positive integer "
                                       "(models:/NAME/VERSION, or models:/NAME@ALIAS)")  # fmt: skip
    elif ref.startswith("m-"):  # an MLflow 3 logged model id
        if not _SAFE_ID.match(ref):
            raise InvalidModelUriError(f"{uri!r}: {ref!r} is not a logged model id (m- then "
                                       "letters, digits, _ and -)")  # fmt: skip
        return ModelUri(text, model_id=ref)
    else:
        raise InvalidModelUriError(f"{uri!r}: name a version or an alias "
                                   f"(models:/{ref or 'NAME'}@production)")  # fmt: skip
    if _bad_segment(name) or "/" in name or ":" in name or "\0" in name:
        raise InvalidModelUriError(f"{uri!r}: {name!r} is not a model name "
                                   "(models:/NAME@ALIAS or models:/NAME/VERSION)")  # fmt: skip
    if "@" in ref:
        return ModelUri(text, name=name, alias=alias)
    return ModelUri(text, name=name, version=version)


def resolve_model_uri(
    uri: str, cache_dir: str | Path | None = None, tracking_uri: str | None = None
) -> ResolvedModel:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/MODEL_ID`, `runs:/RUN_ID/model`
    or a local path (a model dir, its config.json or model.safetensors) -> a local model dir
    (downloads are cached under `cache_dir`)."""
    uri = str(uri)
    parsed = parse_model_uri(uri)  # InvalidModelUriError before any server is asked
    if parsed is not None and parsed.run_id:
        return _resolve_run(parsed, cache_dir, tracking_uri)
    if parsed is not None:
        return _resolve_registry(parsed, cache_dir, tracking_uri)
    if re.match(r"^[a-zA-Z][\w+.-]*:/", uri) and not uri.startswith("file:"):
        raise TrackingError(f"unsupported model URI {uri!r}: use models:/, runs:/ or a local path")
    local = Path(uri.removeprefix("file://")).expanduser()
    if not local.exists():
        raise ModelNotFoundError(f"model path {local} does not exist")
    if local.is_file() and local.name in (MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE):
        local = local.parent  # a model dir's own file names the dir, as for load_model_dir
    found = find_model_dir(local)
    if found is None:
        raise ModelNotFoundError(f"{local} is not a model dir (no {MODEL_CONFIG_FILE})")
    return ResolvedModel(found.resolve(), None, None, None, uri)


def _resolve_registry(
    parsed: ModelUri, cache_dir: str | Path | None, tracking_uri: str | None
) -> ResolvedModel:
    client, server = _client(tracking_uri)
    uri, name = parsed.uri, parsed.name
    if parsed.model_id:
        return _resolve_logged_model(client, server, parsed.model_id, uri, cache_dir)
    root = _cache_root(cache_dir)
    try:
        if parsed.alias:
            mv = client.get_model_version_by_alias(name, parsed.alias)
        else:
            mv = client.get_model_version(name, parsed.version)
        download_uri = client.get_model_version_download_uri(name, mv.version)
    except Exception as exc:
        if _is_not_found(exc) or _http_status(exc) == 400:
            raise ModelNotFoundError(f"{uri} not found on {server}: {_one_line(exc)}") from exc
        error = _tracking_error(f"resolve {uri}", server, exc)
        if _is_transient(exc):
            cached = _registry_fallback(root, server, parsed, exc)
            if cached is not None:
                return cached
        raise error from exc
    if not _VERSION.match(str(mv.version)):  # a path segment of the cache: never "../.."
        raise TrackingError(f"the registry at {redact_uri(server)} answered {uri} with "
                            f"version {str(mv.version)!r}, which is not a version number: "
                            "refused")  # fmt: skip
    stamp = {"source": download_uri, "run_id": mv.run_id, "created": mv.creation_timestamp}
    key = (_slug(server), "registry", name, str(mv.version))
    path = _download_cached(download_uri, server, root, key, stamp, uri)
    if parsed.alias:
        _remember_alias(_inside_cache(root, key[:-1], uri), parsed.alias, str(mv.version))
    return ResolvedModel(path, name, str(mv.version), mv.run_id, uri)


def _alias_record(model_root: Path, alias: str) -> Path:
    # Beside the model's version dirs; alias names are letters, digits, _ and - (_ALIAS).
    return model_root / f"@{alias}.json"


def _remember_alias(model_root: Path, alias: str, version: str) -> None:
    """Record the version `alias` resolved to, for _registry_fallback (written by rename)."""
    record = _alias_record(model_root, alias)
    tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(json.dumps({"version": version, "resolved_at": time.time()}))
        os.replace(tmp, record)
    except OSError as exc:  # a cache that cannot take it only loses the outage fallback
        log.warning("could not record %s -> version %s in the model cache: %s", alias, version,
                    exc)  # fmt: skip
        tmp.unlink(missing_ok=True)


def remember_alias_version(
    uri: str, version: str, cache_dir: str | Path | None = None, tracking_uri: str | None = None
) -> bool:
    """Record that the alias `uri` (models:/NAME@ALIAS) names `version` now, as resolving it
    does: a worker that swapped to the alias's new version by its number keeps the outage
    fallback (and prune_model_cache) on that version, not on the one it started with. False if
    `uri` names no alias or `version` is no version number; nothing is asked of MLflow."""
    parsed = parse_model_uri(uri)
    if parsed is None or parsed.alias is None or not _VERSION.match(str(version)):
        return False
    server = tracking_uri or default_tracking_uri()
    key = (_slug(server), "registry", str(parsed.name))
    _remember_alias(_inside_cache(_cache_root(cache_dir), key, uri), parsed.alias, str(version))
    return True


def _registry_fallback(
    root: Path, server: str, parsed: ModelUri, exc: BaseException
) -> ResolvedModel | None:
    """While the registry is unreachable, the cached copy of a pinned version, or of the
    version an alias last resolved to here; None if the cache has neither. Never for a
    registry that answered "not found": only a transient error comes here."""
    model_root = root.joinpath(_slug(server), "registry", str(parsed.name))
    version = parsed.version
    if parsed.alias:
        try:
            recorded = json.loads(_alias_record(model_root, parsed.alias).read_text())
            version = str(recorded["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if not _VERSION.match(str(version)):  # a record not written by _remember_alias
        return None
    try:
        target = _inside_cache(root, (_slug(server), "registry", str(parsed.name), str(version)),
                               parsed.uri)  # fmt: skip
    except TrackingError:
        return None
    with _entry_lock(target, shared=True):  # no prune between the look and the mark
        try:
            stamp = json.loads((target / _CACHE_STAMP).read_text())
        except (OSError, ValueError):
            return None
        path = find_model_dir(target)
        if path is None:
            return None
        _mark_used(target)
    as_of = ", the version it last resolved to here (it may have moved since)" if parsed.alias \
        else ""
    log.warning("the model registry at %s is unreachable (%s): serving %s from the cache as "
                "version %s%s: %s", redact_uri(server), _one_line(exc), parsed.uri, version, as_of,
                path)  # fmt: skip
    return ResolvedModel(path, parsed.name, str(version), stamp.get("run_id"), parsed.uri)


def _resolve_logged_model(
    client: Any, server: str, model_id: str, uri: str, cache_dir: str | Path | None
) -> ResolvedModel:
    try:
        logged = client.get_logged_model(model_id)
    except Exception as exc:
        if _is_not_found(exc) or _http_status(exc) == 400:
            raise ModelNotFoundError(f"{uri} not found on {server}") from exc
        raise _tracking_error(f"resolve {uri}", server, exc) from exc
    stamp = {"source": logged.artifact_location, "run_id": logged.source_run_id}
    key = (_slug(server), "logged", model_id)
    path = _download_cached(logged.artifact_location, server, _cache_root(cache_dir), key, stamp,
                            uri)  # fmt: skip
    return ResolvedModel(path, None, None, logged.source_run_id, uri)


def _resolve_run(
    parsed: ModelUri, cache_dir: str | Path | None, tracking_uri: str | None
) -> ResolvedModel:
    client, server = _client(tracking_uri)
    uri, run_id, sub = parsed.uri, parsed.run_id, parsed.path or MODEL_ARTIFACT
    try:
        run = client.get_run(run_id)
        source = _run_model_location(client, run, sub)
    except ModelNotFoundError:
        raise
    except Exception as exc:
        if _is_not_found(exc) or _http_status(exc) == 400:
            raise ModelNotFoundError(f"{uri} not found on {server}: {_one_line(exc)}") from exc
        raise _tracking_error(f"resolve {uri}", server, exc) from exc
    key = (_slug(server), "runs", run_id, *sub.split("/"))
    path = _download_cached(source, server, _cache_root(cache_dir), key, {"source": source}, uri)
    return ResolvedModel(path, None, None, run_id, uri)


def _run_model_location(client: Any, run: Any, sub: str) -> str:
    """In MLflow 3 `runs:/RUN/model` names the logged model `model` of that run (its newest
    finished one); fall back to a plain run artifact at that path (a model dir logged with
    log_artifact)."""
    name, _, rest = sub.partition("/")
    run_id = run.info.run_id
    # Filtered on the run, not the experiment: every training run logs a `model` there, and
    # only a first page (100, newest first) came back, so older runs stopped resolving.
    found: list[Any] = []
    token = None
    while True:
        page = client.search_logged_models(
            experiment_ids=[run.info.experiment_id], page_token=token,
            filter_string=f"name = '{name}' AND source_run_id = '{run_id}'",
        )  # fmt: skip
        found += [m for m in page if m.source_run_id == run_id and m.name == name]
        token = page.token
        if not token:
            break
    # A publish that died after creating its logged model leaves a newer one still PENDING.
    ready = [m for m in found if str(getattr(m.status, "value", m.status)) == "READY"]
    if ready:
        newest = max(ready, key=lambda m: m.creation_timestamp or 0)
        return newest.artifact_location.rstrip("/") + (f"/{rest}" if rest else "")
    if client.list_artifacts(run_id, sub):
        return f"{run.info.artifact_uri.rstrip('/')}/{sub}"
    unfinished = f" ({len(found)} logged model(s) named {name!r}, none finished)" if found else ""
    raise ModelNotFoundError(f"run {run_id} has no model or artifact {sub!r}{unfinished}")


def _cache_root(cache_dir: str | Path | None) -> Path:
    # The variable the worker's settings read too (LLM_MODEL_CACHE_DIR): one cache per machine.
    root = cache_dir or os.environ.get("LLM_MODEL_CACHE_DIR") or DEFAULT_CACHE_DIR
    return Path(root).expanduser()


def _slug(server: str) -> str:
    # One cache subtree per tracking server: two servers can both have an llm/1. The readable
    # part leaves credentials out (the path is logged); the hash of the whole URI keeps apart
    # two users' entries.
    host = _USERINFO.sub(r"\g<scheme>", server).split("://", 1)[-1]
    readable = re.sub(r"[^A-Za-z0-9.-]+", "_", host).strip("_")[:40]
    return f"{readable}-{hashlib.sha256(server.encode()).hexdigest()[:8]}"


def _inside_cache(root: Path, key: Sequence[str], uri: str) -> Path:
    """root/key, if each part of key is one plain name and it lies inside the cache root once
    resolved (symlinks); TrackingError otherwise. Every path the cache creates, sweeps, renames
    or removes is checked here first, whatever the parser and the registry's replies let
    through."""
    target = root.joinpath(*key)
    base = root.resolve()
    resolved = target.resolve()
    odd = any(_bad_segment(part) or "/" in part or "\0" in part for part in key)
    if odd or resolved == base or not resolved.is_relative_to(base):
        raise TrackingError(f"cache entry {'/'.join(key)!r} for {uri} lies outside the model "
                            f"cache {root} ({resolved}): refused")  # fmt: skip
    return target


def _download_cached(
    artifact_uri: str,
    server: str,
    root: Path,
    key: Sequence[str],
    stamp: dict[str, Any],
    uri: str,
) -> Path:
    """Download once into root/key (atomic rename); reuse it while its stamp still matches.
    root/key must lie inside root (_inside_cache), checked before anything is touched."""
    target = _inside_cache(root, key, uri)
    with _entry_lock(target, shared=True):  # no prune between the look and the mark
        cached = _cached_model_dir(target, stamp)
        if cached is not None:
            _mark_used(target)
            return cached
    import mlflow.artifacts

    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_abandoned(target.parent)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        try:
            got = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, tracking_uri=server, dst_path=str(tmp)
            ))  # fmt: skip
        except Exception as exc:
            raise _tracking_error(f"download {uri}", server, exc) from exc
        if find_model_dir(got) is None:
            raise ModelNotFoundError(f"{uri} holds no model dir (no {MODEL_CONFIG_FILE})")
        (got / _CACHE_STAMP).write_text(json.dumps(stamp, sort_keys=True))
        _publish(got, target, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = _cached_model_dir(target, stamp)
    if found is None:  # another process published a different stamp meanwhile
        raise TrackingError(f"cache entry {target} for {uri} was replaced while downloading; "
                            "the registry changed under it, try again")  # fmt: skip
    return found


def _cached_model_dir(target: Path, stamp: dict[str, Any]) -> Path | None:
    try:
        saved = json.loads((target / _CACHE_STAMP).read_text())
    except (OSError, ValueError):
        return None
    if saved != json.loads(json.dumps(stamp, sort_keys=True)):
        return None
    return find_model_dir(target)


def _publish(src: Path, target: Path, stamp: dict[str, Any]) -> None:
    """Move a finished download into place. An entry with the same stamp is another process's
    finished download, perhaps being loaded now: it is kept and `src` left to the caller to
    discard. An entry with another stamp is stale and swapped out."""
    # Publishers take turns, so none can swap out an entry another has just checked or placed.
    with _entry_lock(target):
        if _cached_model_dir(target, stamp) is not None:
            return
        stale = target.parent / f".{target.name}.stale-{secrets.token_hex(4)}"
        if target.exists():
            target.rename(stale)
        src.rename(target)
    shutil.rmtree(stale, ignore_errors=True)


def _sweep_abandoned(parent: Path) -> None:
    """Remove download and stale dirs left by crashed processes; one written to within
    ABANDONED_AFTER_S (a download in progress) is kept."""
    for leftover in [*parent.glob(".*.tmp-*"), *parent.glob(".*.stale-*")]:
        try:
            newest = max(p.lstat().st_mtime for p in [leftover, *leftover.rglob("*")])
        except OSError:  # removed meanwhile
            continue
        if time.time() - newest > ABANDONED_AFTER_S:
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _entry_lock(entry: Path, shared: bool = False) -> Iterator[None]:
    """The lock on cache entry `entry`, held for the block (released when its file closes):
    publishers and prunes take it exclusive; a cache hit takes it shared, so a prune (which
    checks the entry's last use and renames it under it) cannot fall between the hit's look and
    its mark. A hit in a cache this process cannot write takes none: nothing can prune it."""
    import fcntl

    try:
        lock = (entry.parent / f".{entry.name}.lock").open("a")
    except OSError:
        if not shared:
            raise
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield


def _mark_used(entry: Path) -> None:
    # The stamp's mtime says when a process last resolved this entry (prune_model_cache).
    try:
        os.utime(entry / _CACHE_STAMP)
    except OSError:  # a read-only cache, which nothing can prune either
        pass


@dataclass(frozen=True)
class PrunedEntry:
    path: Path  # where the cached model was (root/<server>/registry/<name>/<version>, ...)
    size: int  # bytes freed


def prune_model_cache(
    cache_dir: str | Path | None, keep: Iterable[str | Path], idle_s: float = RECENTLY_USED_S
) -> list[PrunedEntry]:
    """Remove the cached models of `cache_dir` (registry versions, runs, logged models) but:
    - those holding a path of `keep` (a model dir resolve_model_uri returned, or its entry);
    - the version each alias record names (@ALIAS.json: the outage fallback loads it);
    - those resolved or downloaded within `idle_s` (another process sharing the cache may be
      loading one; each cache hit marks its entry);
    - anything not a finished entry: downloads in progress, locks, dot names, symlinks.
    Only the cache root's own contents are touched, never a local model dir given as a URI.
    Each entry is renamed aside under its publish lock, then deleted: a crash midway leaves a
    .stale- dir (swept once idle for ABANDONED_AFTER_S), never a half-deleted entry that looks
    finished and loads as a broken model.
    Download and stale dirs abandoned for ABANDONED_AFTER_S are swept on the way."""
    root = _cache_root(cache_dir)
    if not root.is_dir():
        return []
    base = root.resolve()
    kept = {Path(p).resolve() for p in keep}
    pruned: list[PrunedEntry] = []
    for entry in _finished_entries(root):
        resolved = entry.resolve()
        if not resolved.is_relative_to(base) or resolved == base:
            continue  # reached through a symlink: not the cache's to remove
        if any(p == resolved or p.is_relative_to(resolved) for p in kept):
            continue
        if entry.name in _alias_versions(entry.parent):
            continue
        size = _remove_entry(entry, idle_s)
        if size is not None:
            pruned.append(PrunedEntry(entry, size))
    return pruned


def _finished_entries(root: Path) -> list[Path]:
    """Each published cache entry (a plain dir holding the stamp) under root; the leftovers of
    crashed downloads and removals beside them are swept on the way."""
    found: list[Path] = []
    for here, dirs, _ in os.walk(root):  # symlinked dirs are listed, never entered
        current = Path(here)
        if current != root and (current / _CACHE_STAMP).is_file():
            found.append(current)
            dirs.clear()  # the model's own files
            continue
        if current != root:
            _sweep_abandoned(current)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (current / d).is_symlink()]
    return found


def _alias_versions(model_root: Path) -> set[str]:
    """The versions the alias records beside these version dirs name (none outside registry/)."""
    versions = set()
    for record in model_root.glob("@*.json"):
        try:
            versions.add(str(json.loads(record.read_text())["version"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable: names nothing _registry_fallback could load either
    return versions


def _tree_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            info = p.lstat()
        except OSError:
            continue
        total += info.st_size if p.is_file() and not p.is_symlink() else 0
    return total


def _used_within(entry: Path, idle_s: float) -> bool:
    try:
        last_used = max(entry.stat().st_mtime, (entry / _CACHE_STAMP).stat().st_mtime)
    except OSError:  # removed or replaced meanwhile: leave it to whoever did that
        return True
    return time.time() - last_used < idle_s


def _remove_entry(entry: Path, idle_s: float) -> int | None:
    """Rename `entry` aside, then delete it, unless it was used within idle_s; the bytes freed,
    or None if kept. The check and the rename hold the lock publishers take, so no download is
    placing or checking it then; a process that found it in the cache marked it (_mark_used)."""
    stale = entry.parent / f".{entry.name}.stale-{secrets.token_hex(4)}"
    with _entry_lock(entry):
        if _used_within(entry, idle_s):
            return None
        try:
            entry.rename(stale)
        except OSError:
            return None
    size = _tree_size(stale)
    shutil.rmtree(stale, ignore_errors=True)
    return size
