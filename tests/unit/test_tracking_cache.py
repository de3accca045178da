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
