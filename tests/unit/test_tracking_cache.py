"""The model download cache: one finished entry per version, shared safely by worker processes.

Downloads are real (MLflow's download_artifacts from a local dir); no server is needed, but
for a registry that answers with a hostile version: a small HTTP stub the real MlflowClient asks.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lmcore import model_uri
from lmcore.mlflow_client import TrackingError

pytestmark = pytest.mark.unit

KEY = ("server", "registry", "llm", "1")
STAMP = {"source": "s", "run_id": "r", "created": 1}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "source"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights")
    return src


def download(source: Path, root: Path, stamp: dict[str, Any] = STAMP) -> Path:
    tracking_uri = f"sqlite:///{root.parent / 'unused.db'}"  # a local source never opens it
    return model_uri._download_cached(str(source), tracking_uri, root, KEY, stamp, "models:/llm/1")


def publish_copy(source: Path, target: Path, stamp: dict[str, Any]) -> None:
    """What another worker's finished download leaves at `target`."""
    target.mkdir(parents=True)
    for f in source.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    (target / model_uri._CACHE_STAMP).write_text(json.dumps(stamp, sort_keys=True))


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".stale-" in p.name]


def test_an_entry_another_worker_published_meanwhile_is_kept_not_swapped(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.artifacts

    root, target = tmp_path / "cache", tmp_path.joinpath("cache", *KEY)
    real = mlflow.artifacts.download_artifacts
    theirs: list[int] = []  # the inode of the other worker's weights

    def others_finish_first(**kwargs: Any) -> str:
        got = real(**kwargs)
        publish_copy(source, target, STAMP)  # and may be loading it already
        theirs.append((target / "model.safetensors").stat().st_ino)
        return got

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", others_finish_first)
    path = download(source, root)
    assert path == target
    assert (path / "model.safetensors").stat().st_ino == theirs[0]
    monkeypatch.undo()
    # Published before this call: the same file again, no download.
    assert download(source, root) == target
    assert (target / "model.safetensors").stat().st_ino == theirs[0]
    assert leftovers(target.parent) == []


def test_a_stale_entry_is_replaced_by_the_new_download(source: Path, tmp_path: Path) -> None:
    target = tmp_path.joinpath("cache", *KEY)
    publish_copy(source, target, {**STAMP, "created": 0})  # a reused version number
    (target / "model.safetensors").write_bytes(b"old weights")
    path = download(source, tmp_path / "cache")
    assert (path / "model.safetensors").read_bytes() == b"weights"
    assert leftovers(target.parent) == []


def test_an_entry_replaced_while_publishing_is_an_error_even_without_asserts(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = model_uri._publish

    def then_another_version(src: Path, target: Path, *args: Any) -> None:
        real(src, target, *args)
        (target / model_uri._CACHE_STAMP).write_text(json.dumps({**STAMP, "created": 2}))

    monkeypatch.setattr(model_uri, "_publish", then_another_version)
    with pytest.raises(TrackingError, match="replaced while downloading"):
        download(source, tmp_path / "cache")


def test_downloads_abandoned_by_crashed_workers_are_swept_and_live_ones_kept(
    source: Path, tmp_path: Path
) -> None:
    parent = tmp_path.joinpath("cache", *KEY[:-1])
    crashed, stale, live = (parent / ".1.tmp-111-aaaa", parent / ".1.stale-bbbb",
                            parent / ".2.tmp-222-cccc")  # fmt: skip
    old = time.time() - 2 * 3600  # untouched for longer than ABANDONED_AFTER_S
    for leftover in (crashed, stale, live):
        (leftover / "artifacts").mkdir(parents=True)
        (leftover / "artifacts" / "part").write_bytes(b"x")
        for p in (leftover, leftover / "artifacts", leftover / "artifacts" / "part"):
            os.utime(p, (old, old))
    os.utime(live / "artifacts" / "part")  # still being written
    download(source, tmp_path / "cache")
    assert not crashed.exists() and not stale.exists()
    assert live.exists()


def test_the_cache_dir_comes_from_the_variable_the_worker_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.common.settings import Settings

    monkeypatch.setenv("LLM_MODEL_CACHE_DIR", str(tmp_path / "models"))
    assert Settings().model_cache_dir == str(tmp_path / "models")
    assert model_uri._cache_root(None) == tmp_path / "models"
    assert model_uri._cache_root(tmp_path / "given") == tmp_path / "given"


def snapshot(path: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
            for p in sorted(path.rglob("*"))}  # fmt: skip


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A directory beside the cache that nothing may touch."""
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "precious.txt").write_text("operator data")
    (victim / "sub" / "more.txt").write_text("more")
    return victim


@pytest.fixture
def hostile_registry(source: Path) -> Iterator[str]:
    """An MLflow REST stub whose alias names the version `../../../../victim`: with the cache
    at tmp/cache, <cache>/<server>/registry/llm/<version> is tmp/victim."""
    version = "../../../../victim"

    class Registry(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if "registered-models/alias" in self.path:
                body: dict[str, Any] = {"model_version": {
                    "name": "llm", "version": version, "run_id": "r1", "creation_timestamp": 1,
                    "source": source.as_uri()}}  # fmt: skip
            elif "get-download-uri" in self.path:
                body = {"artifact_uri": source.as_uri()}
            elif "registered-models/get" in self.path:
                body = {"registered_model": {"name": "llm"}}
            else:
                self.send_response(404)
                self.end_headers()
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_resolve_refuses_registry_version_that_escapes_the_cache(
    hostile_registry: str, victim: Path, tmp_path: Path
) -> None:
    before = snapshot(victim)
    cache = tmp_path / "cache"
    with pytest.raises(TrackingError, match=r"version '\.\./\.\./\.\./\.\./victim'"):
        model_uri.resolve_model_uri("models:/llm@production", cache_dir=cache,
                                    tracking_uri=hostile_registry)  # fmt: skip
    assert snapshot(victim) == before  # not renamed away, replaced or deleted
    assert {p.name for p in tmp_path.iterdir()} - {"cache"} == {"source", "victim"}
    assert not [p for p in cache.rglob("*") if p.suffix == ".json"]  # no alias record either


def test_a_cache_key_that_leads_outside_the_cache_is_refused_before_anything_is_touched(
    source: Path, victim: Path, tmp_path: Path
) -> None:
    # Whatever check upstream missed, the cache itself never mkdirs, sweeps, renames or removes
    # outside its root.
    before = snapshot(victim)
    (victim / ".victim.stale-dead").mkdir()  # what a sweep would remove, if it ran there
    old = time.time() - 2 * 3600
    os.utime(victim / ".victim.stale-dead", (old, old))
    for key in [("server", "registry", "llm", "../../../../victim"), ("..", "victim"),
                ("server", "..", "..", "elsewhere", "x"), ("server", "runs", "r", "..", "..")]:
        with pytest.raises(TrackingError, match="outside the model cache"):
            model_uri._download_cached(str(source), "sqlite:///unused.db", tmp_path / "cache", key,
                                       STAMP, "models:/llm/1")  # fmt: skip
    assert (victim / ".victim.stale-dead").exists()
    (victim / ".victim.stale-dead").rmdir()
    assert snapshot(victim) == before
    assert {p.name for p in tmp_path.iterdir()} - {"cache"} == {"source", "victim"}
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def test_a_symlink_inside_the_cache_that_leads_out_of_it_is_refused(
    source: Path, victim: Path, tmp_path: Path
) -> None:
    before = snapshot(victim)
    (tmp_path / "cache" / "server" / "registry").mkdir(parents=True)
    (tmp_path / "cache" / "server" / "registry" / "llm").symlink_to(victim)
    with pytest.raises(TrackingError, match="outside the model cache"):
        download(source, tmp_path / "cache")
    assert snapshot(victim) == before


# -- pruning: a long-lived worker keeps the version it serves and the one before, not all --

HOURS_AGO = time.time() - 2 * 3600  # older than RECENTLY_USED_S and ABANDONED_AFTER_S


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def registry_server() -> str:
    """A tracking server nobody listens on: the cache is all the resolver has (an outage)."""
    return f"http://127.0.0.1:{free_port()}"


def cache_version(source: Path, root: Path, server: str, key_tail: tuple[str, ...]) -> Path:
    """One finished entry, written by the cache's own download path."""
    key = (model_uri._slug(server), *key_tail)
    stamp = {"source": str(source), "run_id": "r", "created": key_tail[-1]}
    return model_uri._download_cached(str(source), server, root, key, stamp, "models:/llm/x")


def age(root: Path) -> None:
    """As if every cached model was last used hours ago."""
    for p in [root, *root.rglob("*")]:
        os.utime(p, (HOURS_AGO, HOURS_AGO), follow_symlinks=False)


def versions_in(root: Path, server: str, name: str = "llm") -> list[str]:
    parent = root / model_uri._slug(server) / "registry" / name
    return sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_pruning_keeps_the_served_and_previous_models_and_removes_every_other_entry(
    source: Path, tmp_path: Path, registry_server: str
) -> None:
    root = tmp_path / "cache"
    paths = {v: cache_version(source, root, registry_server, ("registry", "llm", v))
             for v in ("1", "2", "3", "4")}  # fmt: skip
    run_entry = cache_version(source, root, registry_server, ("runs", "abc123", "model"))
    logged = cache_version(source, root, registry_server, ("logged", "m-0123"))
    age(root)

    pruned = model_uri.prune_model_cache(root, {paths["4"], paths["3"]})

    assert versions_in(root, registry_server) == ["3", "4"]
    assert sorted(p.path for p in pruned) == sorted([paths["1"], paths["2"], run_entry, logged])
    weights = len(b"weights") + len("{}")
    assert all(p.size > weights for p in pruned)  # model files and stamp, measured before
    assert not run_entry.exists() and not logged.exists()
    assert not [p for p in root.rglob("*") if ".stale-" in p.name]  # deleted, not just moved
    assert (paths["4"] / "model.safetensors").read_bytes() == b"weights"


def test_the_version_an_alias_record_names_survives_pruning_and_loads_during_an_outage(
    source: Path, tmp_path: Path, registry_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    root = tmp_path / "cache"
    paths = {v: cache_version(source, root, registry_server, ("registry", "llm", v))
             for v in ("1", "2", "3")}  # fmt: skip
    assert model_uri.remember_alias_version("models:/llm@production", "1", root, registry_server)
    age(root)

    model_uri.prune_model_cache(root, {paths["3"]})

    assert versions_in(root, registry_server) == ["1", "3"]
    # MLflow is down (nothing listens there): the alias still loads, as the version recorded.
    got = model_uri.resolve_model_uri("models:/llm@production", root, registry_server)
    assert (got.path, got.version) == (paths["1"], "1")


def test_pruning_leaves_recent_entries_downloads_in_progress_and_what_the_cache_did_not_write(
    source: Path, tmp_path: Path, registry_server: str, victim: Path
) -> None:
    root = tmp_path / "cache"
    recent = cache_version(source, root, registry_server, ("registry", "llm", "1"))
    old = cache_version(source, root, registry_server, ("registry", "llm", "2"))
    parent = old.parent
    downloading = parent / ".3.tmp-999-abcd"  # another worker's download, written to just now
    (downloading / "model").mkdir(parents=True)
    (downloading / "model" / model_uri._CACHE_STAMP).write_text("{}")
    crashed = parent / ".4.stale-dead"  # a removal that crashed between rename and delete
    (crashed / "model").mkdir(parents=True)
    not_ours = root / "notes"  # no stamp: not a cache entry
    not_ours.mkdir()
    (not_ours / "keep.txt").write_text("x")
    (parent / "5").symlink_to(victim, target_is_directory=True)
    (victim / model_uri._CACHE_STAMP).write_text("{}")  # even if it looks like an entry
    age(root)
    os.utime(downloading / "model" / model_uri._CACHE_STAMP)
    before = snapshot(victim)
    # Another process resolved version 1 a moment ago: the cache hit marks it in use.
    assert cache_version(source, root, registry_server, ("registry", "llm", "1")) == recent

    pruned = model_uri.prune_model_cache(root, set())

    assert [p.path for p in pruned] == [old]
    assert recent.exists() and downloading.exists() and (not_ours / "keep.txt").exists()
    assert not crashed.exists()  # swept: idle for longer than ABANDONED_AFTER_S
    assert snapshot(victim) == before and (parent / "5").is_symlink()


def test_a_prune_waits_for_a_cache_hit_between_its_look_and_its_mark_and_then_keeps_it(
    source: Path, tmp_path: Path, registry_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process sharing the cache pruned in the moment between this one's look at the
    entry and its mark: the hit returned a path that no longer existed."""
    root = tmp_path / "cache"
    entry = cache_version(source, root, registry_server, ("registry", "llm", "1"))
    age(root)
    mark, pruned = model_uri._mark_used, []
    prune = threading.Thread(target=lambda: pruned.extend(model_uri.prune_model_cache(root, ())))

    def prune_in_between(target: Path) -> None:
        prune.start()
        prune.join(0.5)  # it waits for the hit's hold on the entry (without one: done by now)
        mark(target)

    monkeypatch.setattr(model_uri, "_mark_used", prune_in_between)
    hit = cache_version(source, root, registry_server, ("registry", "llm", "1"))
    prune.join(10)
    assert not prune.is_alive() and pruned == []  # it saw the mark: used just now
    assert hit == entry and (hit / "model.safetensors").read_bytes() == b"weights"


def test_a_local_model_dir_outside_the_cache_is_never_touched(
    source: Path, tmp_path: Path, registry_server: str
) -> None:
    root = tmp_path / "cache"
    cache_version(source, root, registry_server, ("registry", "llm", "1"))
    age(root)
    before = snapshot(source)
    assert len(model_uri.prune_model_cache(root, {source})) == 1
    assert snapshot(source) == before
    assert model_uri.prune_model_cache(tmp_path / "no-cache-yet", set()) == []
