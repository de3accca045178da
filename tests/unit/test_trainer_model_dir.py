"""`python -m services.trainer` refuses a train.model_dir that would publish over the token cache
or the checkpoints, in one line (exit 2), before any data is prepared or step trained."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcore.data import prepare_corpus
from lmcore.train_state import list_training_states
from services.trainer.__main__ import main
from tests.helpers.trainer_run import write_corpus

pytestmark = pytest.mark.unit


def snapshot(root: Path) -> list[tuple[str, bytes | None]]:
    return sorted((str(p), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def train(corpus: Path, cache: Path, ckpt: Path, model_dir: Path, steps: int = 2) -> list[str]:
    return ["model=tiny", "model.block_size=32", "data=text", f"data.source={corpus}",
            f"data.cache_dir={cache}", f"train.max_steps={steps}", "train.batch_size=2",
            "train.eval_batches=1", "train.device=cpu", "train.progress=false",
            "train.quantization_report=false", "tracking.enabled=false",
            f"train.checkpoint_dir={ckpt}", f"train.model_dir={model_dir}"]  # fmt: skip


def test_a_model_dir_that_is_the_data_cache_dir_is_refused_and_the_cache_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run trained on the cache, then published the model over it, deleting it."""
    corpus = write_corpus(tmp_path / "corpus.txt", lines=600)
    cache = tmp_path / "cache"
    prepare_corpus(corpus, cache, vocab_size=300, progress=False)
    before = snapshot(cache)
    assert main(train(corpus, cache, tmp_path / "ckpt", model_dir=cache)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: train.model_dir {cache} is data.cache_dir {cache}; they must not "
                   "overlap (publishing replaces the whole model dir, and checkpoints and token "
                   "data are deleted and rebuilt in theirs): give the model a dir of its own, "
                   "e.g. the default <checkpoint_dir>/model")  # fmt: skip
    assert snapshot(cache) == before
    assert not (tmp_path / "ckpt").exists()


def test_a_model_dir_that_is_the_checkpoint_dir_is_refused_before_the_data_is_prepared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The rerun resumed, trained, then published over checkpoint_dir: every checkpoint went."""
    corpus = write_corpus(tmp_path / "corpus.txt", lines=600)
    ckpt = tmp_path / "ckpt"
    first = train(corpus, tmp_path / "cache", ckpt, model_dir=ckpt / "model")
    assert main([*first, "train.checkpoint_interval=1"]) == 0
    before = snapshot(ckpt)
    cache = tmp_path / "another-cache"
    assert main(train(corpus, cache, ckpt, model_dir=ckpt, steps=4)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: train.model_dir {ckpt} is checkpoint_dir {ckpt}; they must "
                          "not overlap")  # fmt: skip
    assert snapshot(ckpt) == before and len(list_training_states(ckpt)) == 2
    assert not cache.exists()  # refused before the corpus was tokenized
