"""`lmctl train --nproc-per-node 2` stopped by a signal: lmctl stays in charge until its ranks stop.

Real processes (lmctl, torchrun, two gloo ranks) and real signals; waits on files and processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmcore.data import TokenDataset
from lmcore.train_state import latest_training_state
from tests.helpers.trainer_run import tiny_corpus

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LMCTL = [sys.executable, "-c", "import sys; from services.cli import main; sys.exit(main())"]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TokenDataset]:
    return tiny_corpus(tmp_path_factory.mktemp("cli-train-corpus"), lines=4000)


def run_processes(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line holds marker: lmctl, torchrun, ranks."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state not in "ZX":
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"]
)
def test_a_signalled_ddp_lmctl_train_exits_only_after_its_ranks_stop(
    corpus: tuple[Path, TokenDataset], tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    """SIGTERM (`kill PID`, to lmctl alone) checkpoints and exits 143, as without
    --nproc-per-node; Ctrl-C (a terminal signals lmctl's whole process group) exits 130.
    Either way lmctl returns once nothing of the run is left running."""
    text, data = corpus
    ckpt = tmp_path / "ckpt"
    args = ["train", "--nproc-per-node", "2", "model=tiny", "model.block_size=32", "data=text",
            f"data.source={text}", f"data.cache_dir={data.path.parent}", "train.batch_size=2",
            "train.max_steps=100000", "train.max_time_s=null", "train.warmup_steps=2",
            "train.checkpoint_interval=5", "train.eval_interval=0", "train.eval_batches=2",
            "train.log_interval=1000", "train.device=cpu", "train.progress=false",
            "train.quantization_report=false", f"train.checkpoint_dir={ckpt}",
            "tracking.enabled=false"]  # fmt: skip
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    log = tmp_path / "lmctl.log"
    # Its own session, as an interactive shell gives a foreground job its own process group.
    lmctl = subprocess.Popen([*LMCTL, *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=log.open("wb"), start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while latest_training_state(ckpt) is None:  # both ranks are training
            assert lmctl.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        assert len(run_processes(str(ckpt))) == 4  # lmctl, torchrun, two ranks

        if sig == signal.SIGINT:
            os.killpg(lmctl.pid, sig)
        else:
            lmctl.send_signal(sig)
        assert lmctl.wait(timeout=TIMEOUT_S) == code, log.read_text()[-3000:]

        assert run_processes(str(ckpt)) == [], log.read_text()[-3000:]
        if sig == signal.SIGTERM:  # the ranks saved the step they stopped at
            stopped = latest_training_state(ckpt)
            assert stopped is not None
            step = int(stopped.name.removeprefix("step-"))
            # (the two ranks' lines may interleave)
            said = f"error: interrupted by SIGTERM at step {step}, checkpoint {stopped}"
            assert said in log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        for pid in run_processes(str(ckpt)):  # what the code under test left, and only that
            os.kill(pid, signal.SIGKILL)
