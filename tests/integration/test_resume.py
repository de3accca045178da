"""`python -m services.trainer` stopped by SIGTERM and restarted ends as an uninterrupted run ends.

Real processes, real signals; waits on files appearing, never on sleeps alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmcore.data import TokenDataset
from lmcore.train import INTERRUPTED_EXIT_CODE
from lmcore.train_state import latest_training_state
from tests.helpers.mlflow_server import running_server
from tests.helpers.trainer_run import tiny_corpus, write_corpus

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240
STEPS = 200


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TokenDataset]:
    return tiny_corpus(tmp_path_factory.mktemp("resume-corpus"), lines=8000)


def trainer_cmd(text: Path, data: TokenDataset, ckpt: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "services.trainer", "model=tiny", "model.block_size=32",
            "data=text", f"data.source={text}", f"data.cache_dir={data.path.parent}",
            f"train.max_steps={STEPS}", "train.batch_size=2", "train.warmup_steps=10",
            "train.checkpoint_interval=5", "train.keep_checkpoints=2", "train.eval_interval=0",
            "train.eval_batches=2", "train.log_interval=50", "train.device=cpu",
            "train.progress=false", f"train.checkpoint_dir={ckpt}", "tracking.enabled=false",
            *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("wb"))


def wait(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{proc.args[:4]} did not finish in {TIMEOUT_S} s")


def wait_for(condition, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sigterm_then_restart_matches_an_uninterrupted_run(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """Tolerance: none. On CPU in fp32 the resumed run replays the same arithmetic (weights,
    AdamW moments, sampler stream, RNG and the step-derived learning rate all come back), so
    its final weights are bit-identical to the uninterrupted run's. Dropout is on, so that
    holds only if the RNG state comes back too (a fresh process starts from the seed's)."""
    text, data = corpus
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    dropout = "model.dropout=0.1"
    straight = start(trainer_cmd(text, data, straight_dir, dropout), tmp_path / "straight.log")
    killed_log = tmp_path / "killed.log"
    killed = start(trainer_cmd(text, data, resumed_dir, dropout), killed_log)

    wait_for(lambda: latest_training_state(resumed_dir) is not None or killed.poll() is not None,
             TIMEOUT_S, "the first checkpoint")
    killed.send_signal(signal.SIGTERM)
    assert wait(killed) == INTERRUPTED_EXIT_CODE
    lines = killed_log.read_text().strip().splitlines()
    assert lines[-1].startswith("error: interrupted by SIGTERM at step ")
    stopped = latest_training_state(resumed_dir)
    assert stopped is not None
    stopped_at = int(stopped.name.removeprefix("step-"))
    assert 5 <= stopped_at < STEPS
    assert lines[-1].startswith(f"error: interrupted by SIGTERM at step {stopped_at},")

    # What a crash mid-save leaves behind: a step dir without its COMPLETE marker and a temp
    # dir, both newer than the real checkpoint. Neither may be picked up.
    half = resumed_dir / f"step-{STEPS - 1:08d}"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 64)
    (half / "state.json").write_text("{\"step\": 199")
    (resumed_dir / f"step-{STEPS - 2:08d}.tmp-1-deadbeef").mkdir()
    assert latest_training_state(resumed_dir) == stopped

    restart_log = tmp_path / "restart.log"
    assert wait(start(trainer_cmd(text, data, resumed_dir, dropout), restart_log)) == 0
    assert f"resumed from {stopped} (step {stopped_at})" in restart_log.read_text()
    assert wait(straight) == 0, (tmp_path / "straight.log").read_text()[-2000:]

    a = load_file(straight_dir / "model" / "model.safetensors")
    b = load_file(resumed_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name
    assert latest_training_state(resumed_dir).name == f"step-{STEPS:08d}"


def test_a_new_corpus_in_the_same_checkpoint_dir_is_refused_until_told_to_start_over(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """`checkpoint_dir: checkpoints/${model.name}` is shared by every run of a model: a run on
    another corpus used to resume the old run's newest checkpoint, train 0 steps and publish
    its weights with the new tokenizer. Now it stops with exit 2 and says what to do."""
    text, data = corpus
    ckpt = tmp_path / "ckpt"
    short = ("train.max_steps=5", "train.quantization_report=false")
    assert wait(start(trainer_cmd(text, data, ckpt, *short), tmp_path / "old.log")) == 0
    old_model = load_file(ckpt / "model" / "model.safetensors")

    other = write_corpus(tmp_path / "other.txt", lines=4000, seed=1)
    refused_log = tmp_path / "refused.log"
    assert wait(start(trainer_cmd(other, data, ckpt, *short), refused_log)) == 2
    last = refused_log.read_text().strip().splitlines()[-1]
    assert last.startswith(f"error: will not resume {ckpt / 'step-00000005'}: data cache_key")
    assert "train.checkpoint_dir" in last and "train.resume=false" in last
    assert load_file(ckpt / "model" / "model.safetensors").keys() == old_model.keys()
    assert (load_file(ckpt / "model" / "model.safetensors")["tok_emb.weight"]
            == old_model["tok_emb.weight"]).all()  # nothing was published

    fresh_log = tmp_path / "fresh.log"
    fresh = trainer_cmd(other, data, ckpt, *short, "train.resume=false")
    assert wait(start(fresh, fresh_log)) == 0, fresh_log.read_text()[-2000:]
    assert "resumed from" not in fresh_log.read_text()
    (aside,) = ckpt.glob("replaced-*")
    assert (aside / "step-00000005" / "COMPLETE").is_file()  # kept, out of the way
    assert latest_training_state(ckpt) == ckpt / "step-00000005"
    assert not (load_file(ckpt / "model" / "model.safetensors")["tok_emb.weight"]
                == old_model["tok_emb.weight"]).all()  # the new run's model


def tracked_cmd(text: Path, data: TokenDataset, ckpt: Path, store: Path, *extra: str) -> list[str]:
    """A few steps, logged to a local MLflow store (no server needed)."""
    cmd = trainer_cmd(text, data, ckpt, "train.checkpoint_interval=2",
                      "train.quantization_report=false", f"tracking.uri=sqlite:///{store}",
                      *extra)  # fmt: skip
    cmd.remove("tracking.enabled=false")
    cmd.remove("train.checkpoint_interval=5")
    return cmd


def mlflow_client(store: Path):  # noqa: ANN201
    from mlflow import MlflowClient

    uri = f"sqlite:///{store}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_resuming_a_deleted_run_starts_a_new_run_instead_of_failing(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """The checkpoint names its MLflow run; deleting that run (a UI clean-up of a killed one)
    made every restart exit 1, so the job used up its backoffLimit and lost its progress."""
    text, data = corpus
    ckpt, store = tmp_path / "ckpt", tmp_path / "mlflow.db"
    no_registry = ("tracking.register_name=null",)
    first_log = tmp_path / "first.log"
    cmd = tracked_cmd(text, data, ckpt, store, "train.max_steps=2", *no_registry)
    assert wait(start(cmd, first_log)) == 0, first_log.read_text()[-2000:]
    client = mlflow_client(store)
    (old_run,) = client.search_runs([client.get_experiment_by_name("llm-pipeline").experiment_id])
    client.delete_run(old_run.info.run_id)

    again_log = tmp_path / "again.log"
    cmd = tracked_cmd(text, data, ckpt, store, "train.max_steps=4", *no_registry)
    assert wait(start(cmd, again_log)) == 0, again_log.read_text()[-2000:]
    log = again_log.read_text()
    assert "resumed from" in log and "starting a new run" in log
    runs = client.search_runs([old_run.info.experiment_id])
    assert [r.info.run_id for r in runs] != [old_run.info.run_id]
    (new_run,) = runs  # search_runs leaves deleted runs out
    assert new_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(new_run.info.run_id, "train_loss")][-1] == 4


def test_resuming_a_finished_and_published_run_registers_nothing_new(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """The same command run again (a Makefile or CI rerun) resumes the final checkpoint and
    trains 0 steps; it used to upload the same weights again, register a new version and move
    `candidate` to it."""
    text, data = corpus
    ckpt, store = tmp_path / "ckpt", tmp_path / "mlflow.db"
    cmd = tracked_cmd(text, data, ckpt, store, "train.max_steps=2")
    for attempt in ("first", "again"):
        log = tmp_path / f"{attempt}.log"
        assert wait(start(cmd, log)) == 0, log.read_text()[-2000:]
    client = mlflow_client(store)
    assert [str(v.version) for v in client.search_model_versions("name = 'llm'")] == ["1"]
    assert str(client.get_model_version_by_alias("llm", "candidate").version) == "1"
    assert "already published" in (tmp_path / "again.log").read_text()

    # A publish that never finished left no record: the next run publishes.
    (ckpt / "step-00000002" / "published.json").unlink()
    log = tmp_path / "unrecorded.log"
    assert wait(start(cmd, log)) == 0, log.read_text()[-2000:]
    assert str(client.get_model_version_by_alias("llm", "candidate").version) == "2"


# A pod's default grace period is 30 s; the KILLED status may take killed_flush_timeout_s (10 s).
SIGTERM_EXIT_BOUND_S = 20


def test_a_sigterm_during_the_registration_retries_exits_143_in_time_and_a_rerun_publishes(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """With MLflow down at the end of a run, the registration retries for up to 15 minutes and
    a SIGTERM was only noted: the pod was SIGKILLed at the end of its grace period. Now the
    SIGTERM ends the retries and the trainer exits 143 at once, the model saved but not
    registered; run again with MLflow back, it resumes the final checkpoint and registers it."""
    text, data = corpus
    ckpt = tmp_path / "ckpt"
    with running_server(tmp_path / "mlflow") as server:
        cmd = trainer_cmd(text, data, ckpt, "train.max_steps=40",
                          "train.quantization_report=false", f"tracking.uri={server.uri}")
        cmd.remove("tracking.enabled=false")
        log = tmp_path / "first.log"
        first = start(cmd, log)
        try:
            wait_for(lambda: "MLflow run " in log.read_text() or first.poll() is not None,
                     TIMEOUT_S, "the MLflow run")
            server.kill()  # down for the rest of the run: the registration retries
            retrying = "cannot read the run yet, retrying"  # the registration's first step
            wait_for(lambda: retrying in log.read_text() or first.poll() is not None,
                     TIMEOUT_S, "a registration retry")
            assert first.poll() is None, log.read_text()[-3000:]
            first.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            try:
                code = first.wait(timeout=SIGTERM_EXIT_BOUND_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {SIGTERM_EXIT_BOUND_S} s after SIGTERM:\n"
                            + log.read_text()[-2000:])
            took = time.monotonic() - t0
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        text_log = log.read_text()
        assert code == INTERRUPTED_EXIT_CODE, text_log[-3000:]
        final = ckpt / "step-00000040"
        assert text_log.strip().splitlines()[-1] == (
            f"error: interrupted by SIGTERM at step 40, checkpoint {final}"), f"{took:.1f} s"
        assert "saved but not registered; run the same command again" in text_log
        assert not (final / "published.json").exists()

        server.start()
        again = tmp_path / "again.log"
        assert wait(start(cmd, again)) == 0, again.read_text()[-3000:]
        assert f"resumed from {final} (step 40)" in again.read_text()
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        (version,) = client.search_model_versions("name = 'llm'")
        assert str(client.get_model_version_by_alias("llm", "candidate").version) == "1"
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED"
        assert f"MLflow run {version.run_id} " in text_log  # the first session's run
