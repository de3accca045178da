"""The model download cache: one finished entry per version, shared safely by worker processes.

Downloads are real (MLflow's download_artifacts from a local dir); no server is needed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from lmcore import tracking
from lmcore.tracking import TrackingError

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
    return tracking._download_cached(str(source), tracking_uri, root, KEY, stamp, "models:/llm/1")


def publish_copy(source: Path, target: Path, stamp: dict[str, Any]) -> None:
    """What another worker's finished download leaves at `target`."""
    target.mkdir(parents=True)
    for f in source.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    (target / tracking._CACHE_STAMP).write_text(json.dumps(stamp, sort_keys=True))


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
    real = tracking._publish

    def then_another_version(src: Path, target: Path, *args: Any) -> None:
        real(src, target, *args)
        (target / tracking._CACHE_STAMP).write_text(json.dumps({**STAMP, "created": 2}))

    monkeypatch.setattr(tracking, "_publish", then_another_version)
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
    assert tracking._cache_root(None) == tmp_path / "models"
    assert tracking._cache_root(tmp_path / "given") == tmp_path / "given"
