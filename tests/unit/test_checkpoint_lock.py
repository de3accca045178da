"""One run per checkpoint dir: the lock waits for, refuses and outlives nobody."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from lmcore import checkpoint_lock
from lmcore.checkpoint_lock import (
    LOCK_FILE,
    CheckpointDirBusy,
    LockWaitStopped,
    lock_checkpoint_dir,
)
from lmcore.config import ModelConfig, preset
from lmcore.data import TokenDataset, prepare_corpus
from lmcore.train import INTERRUPTED_EXIT_CODE, TrainConfig, Trainer, TrainingInterrupted
from lmcore.train_state import latest_training_state
from tests.helpers.trainer_run import write_corpus

pytestmark = pytest.mark.unit

HOLD = """
import sys, time
from lmcore.checkpoint_lock import lock_checkpoint_dir
lock = lock_checkpoint_dir(sys.argv[1], 0)
print("held", flush=True)
time.sleep(300)
"""


def hold_in_another_process(ckpt_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(ckpt_dir)], text=True,
                            stdout=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def tiny_run(tmp_path: Path, **changes: Any) -> tuple[ModelConfig, TrainConfig, TokenDataset]:
    """A two-step run of the tiny model on a small corpus, checkpointing to tmp_path/ckpt."""
    data = prepare_corpus(write_corpus(tmp_path / "c.txt", lines=2000), tmp_path / "cache",
                          vocab_size=512, progress=False)  # fmt: skip
    model = preset("tiny", vocab_size=data.tokenizer.vocab_size, block_size=32)
    cfg = TrainConfig(**{**dict(batch_size=2, max_steps=2, warmup_steps=0, eval_interval=0,
                                eval_batches=1, device="cpu", progress=False,
                                checkpoint_dir=str(tmp_path / "ckpt"),
                                quantization_report=False), **changes})  # fmt: skip
    return model, cfg, data


def test_a_second_run_waits_then_refuses_naming_the_holder(tmp_path: Path) -> None:
    first = lock_checkpoint_dir(tmp_path, 0)
    with pytest.raises(CheckpointDirBusy) as refused:
        lock_checkpoint_dir(tmp_path, 0.3, poll_s=0.05)
    assert f"pid {os.getpid()} on " in str(refused.value)
    assert "train.checkpoint_dir" in str(refused.value)
    first.release()
    lock_checkpoint_dir(tmp_path, 0).release()  # free again once released


def test_a_waiting_run_gets_the_lock_when_the_holder_lets_go(tmp_path: Path) -> None:
    first = lock_checkpoint_dir(tmp_path, 0)
    threading.Timer(0.3, first.release).start()
    second = lock_checkpoint_dir(tmp_path, 30, poll_s=0.05)
    assert second.held and not first.held
    second.release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = hold_in_another_process(tmp_path)
    with pytest.raises(CheckpointDirBusy, match=f"pid {holder.pid} on "):
        lock_checkpoint_dir(tmp_path, 0)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock_checkpoint_dir(tmp_path, 0).release()  # at once: the kernel dropped the dead one's lock
    assert (tmp_path / LOCK_FILE).exists()  # never unlinked (see lock_checkpoint_dir)


def test_storage_without_locks_warns_and_runs_unlocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What flock does on a mount that has no locks (no such mount here to try it on)."""

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(checkpoint_lock.fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="lmcore.checkpoint_lock"):
        lock = lock_checkpoint_dir(tmp_path, 5)
    assert not lock.held and "cannot be locked" in caplog.text


def test_a_trainer_refuses_a_checkpoint_dir_another_run_holds_and_writes_nothing(
    tmp_path: Path
) -> None:
    model, cfg, data = tiny_run(tmp_path, checkpoint_lock_wait_s=0.5)
    ckpt = tmp_path / "ckpt"
    holder = hold_in_another_process(ckpt)
    try:
        with pytest.raises(CheckpointDirBusy, match=f"in use by another training run \\(pid "
                                                    f"{holder.pid} on "):  # fmt: skip
            Trainer(model, cfg, data).fit()
        assert latest_training_state(ckpt) is None and not (ckpt / "model").exists()
    finally:
        holder.kill()
        holder.wait()
    # Once the other run is gone this one trains, and lets go at its end (a lock it kept would
    # refuse this one, even in this process: flock locks belong to the open file).
    assert Trainer(model, cfg, data).fit().steps == 2
    lock_checkpoint_dir(ckpt, 0).release()


def test_a_checkpoint_dir_that_cannot_be_made_fails_before_training(tmp_path: Path) -> None:
    """It used to fail at the first checkpoint, after the steps before it had been trained."""
    (tmp_path / "a-file").write_text("")
    ckpt = tmp_path / "a-file" / "ckpt"
    model, cfg, data = tiny_run(tmp_path, checkpoint_dir=str(ckpt))
    with pytest.raises(RuntimeError, match=f"checkpoint_dir {ckpt}: .*Not a directory") as failed:
        Trainer(model, cfg, data).fit()
    assert not isinstance(failed.value, CheckpointDirBusy)


def test_a_stop_ends_the_wait_for_the_lock_at_once(tmp_path: Path) -> None:
    """A SIGTERM (the stop flag) used to be ignored for the whole wait, 120 s by default: past a
    pod's 30 s grace, so the kubelet's SIGKILL ended it instead."""
    holder = lock_checkpoint_dir(tmp_path, 0)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(LockWaitStopped, match="stopped while waiting"):
        lock_checkpoint_dir(tmp_path, 60, poll_s=0.05, stop=stop)
    holder.release()


def test_a_trainer_stopped_while_it_waits_for_the_lock_exits_as_interrupted(
    tmp_path: Path,
) -> None:
    model, cfg, data = tiny_run(tmp_path, checkpoint_lock_wait_s=60)
    ckpt = tmp_path / "ckpt"
    holder = lock_checkpoint_dir(ckpt, 0)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(TrainingInterrupted) as stopped:
        Trainer(model, cfg, data, stop=stop).fit()
    holder.release()
    assert stopped.value.exit_code == INTERRUPTED_EXIT_CODE and stopped.value.step == 0
    assert "while waiting for checkpoint_dir" in str(stopped.value)
    assert latest_training_state(ckpt) is None
