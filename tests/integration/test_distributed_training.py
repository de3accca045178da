"""DDP on CPU (gloo) with real processes: torchrun, and the environment of PyTorchJob pods.

Processes run tests/helpers/trainer_run.py or `python -m services.trainer`; no mocks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lmcore.checkpoint_lock import lock_checkpoint_dir
from lmcore.config import preset
from lmcore.data import TokenDataset, prepare_corpus
from lmcore.distributed import DistEnv
from lmcore.train import INTERRUPTED_EXIT_CODE, Trainer, TrainConfig
from lmcore.train_state import latest_training_state
from tests.helpers.trainer_run import tiny_corpus, write_corpus

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
HELPER = ["-m", "tests.helpers.trainer_run"]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TokenDataset]:
    """A corpus file and its token cache, built with the tiny preset's settings (vocab 512)."""
    return tiny_corpus(tmp_path_factory.mktemp("ddp-corpus"), lines=8000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PET_", "TORCHELASTIC_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    # cwd: the log's dir, so nothing a run writes relative to cwd lands in the repo.
    return subprocess.Popen(cmd, cwd=log.parent, env=child_env(**env), stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen[bytes], log: Path) -> None:
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{proc.args} did not finish in {TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
    assert rc == 0, f"exit {rc}:\n{log.read_text()[-3000:]}"


def calls(out: Path, rank: int) -> list[dict]:
    path = out / f"calls.rank{rank}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_ranks_stay_identical_lower_the_loss_and_only_rank_0_tracks(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    _, data = corpus
    out = tmp_path / "ddp"
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *HELPER,
           "--dataset", str(data.path), "--out", str(out), "--steps", "12",
           "--eval-interval", "6", "--mlflow-uri", mlflow_uri]
    log = tmp_path / "torchrun.log"
    finish(start(cmd, log), log)

    w0, w1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert w0.keys() == w1.keys()
    for name in w0:  # DDP keeps replicas bit-identical
        assert torch.equal(w0[name], w1[name]), name

    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["run_id"] == r1["run_id"] and r0["run_id"]  # rank 0's run id, broadcast
    losses = [v for _, v in r0["history"]["train_loss"]]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
    val = [v for _, v in r0["history"]["val_loss"]]
    assert val[-1] < val[0]

    assert calls(out, 1) == []  # rank 1 was handed the tracker too, and never called it
    methods = [c["method"] for c in calls(out, 0)]
    assert methods[0] == "start_run" and methods[-1] == "end_run"
    assert "log_model_dir" in methods and methods.count("log_metrics") >= 12

    # The same story in the MLflow store: one run, rank 0's metrics, a registered candidate.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    exp = client.get_experiment_by_name("trainer-run-test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [r0["run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(r0["run_id"], "train_loss")) == 12
    version = client.get_model_version_by_alias("trainer-run-test", "candidate")
    assert version.run_id == r0["run_id"]


def test_a_time_budget_stops_both_ranks_at_the_same_step_with_identical_weights(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """The ranks agree on the elapsed time through the stop vote, so they take the same
    learning rate every step (else the replicas would drift apart) and stop together."""
    _, data = corpus
    out = tmp_path / "ddp"
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *HELPER,
           "--dataset", str(data.path), "--out", str(out), "--steps", "100000",
           "--max-time", "3"]
    log = tmp_path / "torchrun.log"
    finish(start(cmd, log), log)

    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["stopped_by_time"] and r1["stopped_by_time"]
    assert r0["steps"] == r1["steps"] and 2 < r0["steps"] < 100000
    assert min(r0["elapsed_s"], r1["elapsed_s"]) >= 3.0
    w0, w1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    assert (out / "model" / "model.safetensors").exists()


def test_a_resumed_budget_run_keeps_decaying_the_lr_on_both_ranks(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """After a resume the ranks start from the checkpoint's elapsed time until their first vote
    comes back; the second step used to see 0 s there and take the full-run (near-peak) LR."""
    _, data = corpus
    ckpt = tmp_path / "ckpt"
    for budget, name in (("2", "first"), ("4", "resumed")):
        cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *HELPER,
               "--dataset", str(data.path), "--out", str(tmp_path / name), "--steps", "100000",
               "--max-time", budget, "--checkpoint-dir", str(ckpt)]
        log = tmp_path / f"{name}.log"
        finish(start(cmd, log), log)

    first, resumed = (json.loads((tmp_path / n / "rank0.json").read_text())
                      for n in ("first", "resumed"))
    assert resumed["steps"] > first["steps"] + 2
    lrs = [c["metrics"]["lr"] for c in calls(tmp_path / "resumed", 0)
           if c["method"] == "log_metrics" and "lr" in c["metrics"]]
    assert len(lrs) == resumed["steps"] - first["steps"]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), lrs[:5]
    w0, w1 = (load_file(tmp_path / "resumed" / f"rank{r}.safetensors") for r in (0, 1))
    for name in w0:  # the same LR on both ranks, step after step
        assert torch.equal(w0[name], w1[name]), name


def test_a_slow_first_step_does_not_cut_a_budgeted_schedule_on_two_ranks(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """Between ranks the time vote lags a step: the budget's pace must still start after the
    first step (3 s here, as compiling), or 6 s would look like 3 steps and the LR would fall to
    min_lr at step 3, then climb back as the pace catches up."""
    _, data = corpus
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *HELPER, "--dataset",
           str(data.path), "--out", str(tmp_path / "out"), "--steps", "100000", "--warmup", "0",
           "--max-time", "6", "--first-step-sleep", "3"]
    log = tmp_path / "run.log"
    finish(start(cmd, log), log)
    lrs = [c["metrics"]["lr"] for c in calls(tmp_path / "out", 0)
           if c["method"] == "log_metrics" and "lr" in c["metrics"]]
    assert len(lrs) > 10, lrs
    # Falls step by step; the budget's estimate of the run's length moves with each step's time,
    # so near the peak (where the cosine is flat) a faster step may lift the LR by a hair
    # (2.5e-5 of it seen), never back up from a cut.
    noise = 1e-3 * lrs[0]
    assert all(b <= a + noise for a, b in zip(lrs, lrs[1:])), lrs[:8]
    assert lrs[2] > 0.9 * lrs[0], lrs[:8]  # still near the peak, not cut to min_lr


def test_first_update_of_2_ranks_x_b_equals_1_rank_x_2b(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """The 1-process run draws exactly the union of both ranks' windows (UnionSampler).

    Tolerance: loss and grad norm to 1e-5 / 1e-4 relative (they see the same numbers summed in
    a different order); weights to 1% of the learning rate, since Adam's first step moves every
    weight by about lr * sign(g) and only gradients within eps of zero can differ more.
    """
    _, data = corpus
    lr = 3e-3
    common = ["--dataset", str(data.path), "--steps", "1", "--batch-size", "4",
              "--warmup", "0", "--lr", str(lr)]
    ddp_log, one_log = tmp_path / "ddp.log", tmp_path / "one.log"
    ddp = start([*TORCHRUN, "--standalone", "--nproc-per-node", "2", *HELPER, *common,
                 "--out", str(tmp_path / "ddp")], ddp_log)
    one = start([sys.executable, *HELPER, *common, "--out", str(tmp_path / "one"),
                 "--union-of-ranks", "2"], one_log)
    finish(ddp, ddp_log)
    finish(one, one_log)

    ddp_w = load_file(tmp_path / "ddp" / "rank0.safetensors")
    one_w = load_file(tmp_path / "one" / "rank0.safetensors")
    for name in one_w:
        torch.testing.assert_close(ddp_w[name], one_w[name], atol=1e-2 * lr, rtol=0)
    ddp_m = next(c["metrics"] for c in calls(tmp_path / "ddp", 0) if c["method"] == "log_metrics")
    one_m = next(c["metrics"] for c in calls(tmp_path / "one", 0) if c["method"] == "log_metrics")
    assert ddp_m["train_loss"] == pytest.approx(one_m["train_loss"], rel=1e-5)
    assert ddp_m["grad_norm"] == pytest.approx(one_m["grad_norm"], rel=1e-4)
    assert json.loads((tmp_path / "one" / "rank0.json").read_text())["world_size"] == 1


class _PublishOutlastingRank1:
    """Rank 0's tracker: registering takes until rank 1 has returned from fit() (or failed),
    however long that is, as a slow or retrying registry may; it records how the run ended."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def start_run(self, experiment: str, run_id: str | None, params: dict) -> str:
        return "slow-publish"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: object, artifact_path: str | None = None) -> None:
        pass

    def log_model_dir(self, model_dir: object, register_name: str | None,
                      alias: str = "candidate") -> str:
        deadline = time.monotonic() + TIMEOUT_S
        while not (self.out / "rank1.done").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return "v1"

    def end_run(self, status: str) -> None:
        (self.out / "end_run").write_text(status)


def _train_with_slow_publish(rank: int, port: int, data_dir: Path, out: Path) -> None:
    torch.set_num_threads(1)
    data = TokenDataset.load(data_dir)
    cfg = TrainConfig(max_steps=4, warmup_steps=1, batch_size=4, eval_interval=0,
                      eval_batches=2, checkpoint_interval=0, checkpoint_dir=str(out / "ckpt"),
                      device="cpu", progress=False, quantization_report=False,
                      dist_timeout_s=10)  # far shorter than the publish below
    model = preset("tiny", vocab_size=data.tokenizer.vocab_size, block_size=64)
    tracker = _PublishOutlastingRank1(out) if rank == 0 else None
    env = DistEnv(rank=rank, world_size=2, master_port=port)
    try:
        result = Trainer(model, cfg, data, tracker, env=env).fit()
    except Exception as exc:
        (out / f"rank{rank}.done").write_text(f"failed: {exc}")
        raise
    (out / f"rank{rank}.done").write_text(f"ok {result.model_version}")


def test_a_publish_slower_than_the_collective_timeout_fails_no_rank(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """Rank 0 reports, saves and registers the model alone (registration retries for up to
    the tracker's publish_timeout_s); the other ranks used to wait for it at a barrier bound
    by dist_timeout_s, time out, and take rank 0 down with them after it had registered."""
    _, data = corpus
    mp.spawn(_train_with_slow_publish, args=(free_port(), data.path, tmp_path), nprocs=2)
    assert (tmp_path / "rank1.done").read_text() == "ok None"
    assert (tmp_path / "rank0.done").read_text() == "ok v1"
    assert (tmp_path / "end_run").read_text() == "FINISHED"


def trainer_args(text: Path, data: TokenDataset, ckpt: Path, *extra: str) -> list[str]:
    return ["-m", "services.trainer", "model=tiny", "model.block_size=64", "data=text",
            f"data.source={text}", f"data.cache_dir={data.path.parent}", "train.batch_size=4",
            "train.warmup_steps=2", "train.eval_interval=0", "train.eval_batches=2",
            "train.device=cpu", "train.progress=false", f"train.checkpoint_dir={ckpt}",
            "train.dist_timeout_s=120", "tracking.enabled=false", *extra]


def pod_env(rank: int, port: int) -> dict[str, str]:
    """What the training operator sets in each pod of a two-pod PyTorchJob."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
            "RANK": str(rank), "PET_NNODES": "2", "PET_NODE_RANK": str(rank),
            "PET_NPROC_PER_NODE": "1", "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port)}


def test_sigterm_on_one_rank_stops_both_at_the_same_step_with_a_checkpoint(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """Kubernetes may signal one pod before the other: that rank's flag reaches every rank
    through the stop vote, all save one checkpoint together and exit for a retry."""
    text, data = corpus
    port, ckpt = free_port(), tmp_path / "ckpt"
    args = trainer_args(text, data, ckpt, "train.max_steps=2000", "train.checkpoint_interval=5")
    procs = [start([sys.executable, *args], tmp_path / f"rank{r}.log", **pod_env(r, port))
             for r in (0, 1)]  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    while latest_training_state(ckpt) is None:  # the ranks are training in step
        assert all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # the worker pod only

    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    assert codes == [INTERRUPTED_EXIT_CODE] * 2, logs[0][-2000:] + logs[1][-2000:]
    last = [log.strip().splitlines()[-1] for log in logs]
    stopped = latest_training_state(ckpt)
    assert stopped is not None
    step = int(stopped.name.removeprefix("step-"))
    assert 5 <= step < 2000
    # Both name the same step, the one the checkpoint holds (rank 0, which wrote it, its path).
    assert last[0].startswith(f"error: interrupted by SIGTERM at step {step}, "), last[0]
    assert last[1] == f"error: interrupted by SIGTERM at step {step}", last[1]
    state = json.loads((stopped / "state.json").read_text())
    assert state["step"] == step and len(state["extra"]["samplers"]) == 2


def live_children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        stat = proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat and int(stat[1]) == pid and stat[0] not in "ZX":
            found.append(int(entry.name))
    return found


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in "ZX"  # an orphan's zombie may never be reaped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_ranks_of_a_sigkilled_torchrun_checkpoint_and_exit(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """A SIGKILLed torchrun (kill -9, the OOM killer) tells its ranks nothing: they trained on
    alone and kept writing the checkpoint dir that a restarted job shares. Now the kernel
    SIGTERMs each rank when torchrun dies, and they stop as on any SIGTERM."""
    _, data = corpus
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    cmd = [*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(free_port()), *HELPER,
           "--dataset", str(data.path), "--out", str(out), "--steps", "100000",
           "--checkpoint-dir", str(ckpt), "--checkpoint-interval", "5"]
    log = tmp_path / "torchrun.log"
    torchrun = start(cmd, log)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while latest_training_state(ckpt) is None:  # both ranks are training
            assert torchrun.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        ranks = live_children(torchrun.pid)
        assert len(ranks) == 2, ranks
        torchrun.kill()
        torchrun.wait()

        deadline = time.monotonic() + 30
        while any(alive(r) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [r for r in ranks if alive(r)], "ranks still training 30 s after torchrun died"
        stopped = latest_training_state(ckpt)
        assert stopped is not None
        assert f"interrupted by SIGTERM at step {int(stopped.name[5:])}, " in log.read_text()
    finally:
        for pid in ranks:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# A rank (started by LAUNCHER) that imports lmcore, then outlives its launcher before asking
# for the parent-death signal, as a torchrun SIGKILLed at that moment leaves it.
RANK_OUTLIVING_ITS_LAUNCHER = """
import os, sys, time
from lmcore.distributed import DistributedEnvError, stop_with_launcher
launcher = os.getppid()
print("imported", flush=True)
while os.getppid() == launcher:
    time.sleep(0.01)
try:
    stop_with_launcher({"TORCHELASTIC_RUN_ID": "test"})
except DistributedEnvError as exc:
    print(exc, flush=True)
    sys.exit(3)
print("trains on", flush=True)
"""
LAUNCHER = """
import subprocess, sys, time
out = open(sys.argv[1], "w")
rank = subprocess.Popen([sys.executable, "-c", sys.argv[2]], stdout=out, stderr=out)
while "imported" not in open(sys.argv[1]).read() and rank.poll() is None:
    time.sleep(0.01)
"""  # then it exits without waiting for the rank


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_rank_whose_launcher_died_before_it_asked_for_sigterm_refuses_to_train(
    tmp_path: Path,
) -> None:
    """The kernel sends the parent-death signal only for a parent alive when it was asked for:
    a rank adopted already would train on alone, so it stops with a launch error instead."""
    out = tmp_path / "rank.out"
    subprocess.run([sys.executable, "-c", LAUNCHER, str(out), RANK_OUTLIVING_ITS_LAUNCHER],
                   env=child_env(), check=True, timeout=TIMEOUT_S)
    deadline = time.monotonic() + 60
    while len(out.read_text().splitlines()) < 2 and time.monotonic() < deadline:  # its verdict
        time.sleep(0.05)
    lines = out.read_text().splitlines()
    assert lines[0] == "imported"
    assert lines[1:] and lines[1].startswith("the launcher (pid ") and "is gone" in lines[1], lines


def test_every_rank_refuses_a_checkpoint_of_another_corpus_and_none_hangs(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """Rank 0 inspects the checkpoint; its refusal reaches every rank, so all exit with it
    instead of the others waiting at the next collective."""
    _, data = corpus
    other = prepare_corpus(write_corpus(tmp_path / "other.txt", lines=2000, seed=1),
                           tmp_path / "cache", tokenizer=data.tokenizer, progress=False)
    ckpt = tmp_path / "ckpt"
    first = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *HELPER, "--dataset",
             str(data.path), "--out", str(tmp_path / "first"), "--steps", "2",
             "--checkpoint-dir", str(ckpt)]
    finish(start(first, tmp_path / "first.log"), tmp_path / "first.log")

    port = free_port()
    again = [sys.executable, *HELPER, "--dataset", str(other.path), "--out",
             str(tmp_path / "again"), "--steps", "4", "--checkpoint-dir", str(ckpt)]
    procs = [start(again, tmp_path / f"rank{r}.log", **pod_env(r, port)) for r in (0, 1)]
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    assert codes == [1, 1], logs
    for log in logs:
        assert "CheckpointMismatchError: will not resume" in log, log[-2000:]
        assert "data cache_key" in log and "train.resume=false" in log
    assert latest_training_state(ckpt).name == "step-00000002"  # left as it was


def test_a_checkpoint_whose_damage_only_rank_1_reads_stops_every_rank_with_its_cause(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """Rank 1's sampler state is its own part of the record: rank 1 failed on it alone with a
    bare KeyError, and rank 0 with gloo's "remote worker crashing" at the next collective (with
    NCCL, a wait for the collective timeout). Every rank now names the checkpoint and cause."""
    _, data = corpus
    ckpt = tmp_path / "ckpt"
    args = [*HELPER, "--dataset", str(data.path), "--checkpoint-dir", str(ckpt)]
    first = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *args,
             "--out", str(tmp_path / "first"), "--steps", "2"]
    finish(start(first, tmp_path / "first.log"), tmp_path / "first.log")
    state_file = latest_training_state(ckpt) / "state.json"
    state = json.loads(state_file.read_text())
    del state["extra"]["samplers"][1]["bit_generator"]
    state_file.write_text(json.dumps(state))

    port = free_port()
    again = [sys.executable, *args, "--out", str(tmp_path / "again"), "--steps", "4"]
    procs = [start(again, tmp_path / f"rank{r}.log", **pod_env(r, port)) for r in (0, 1)]
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    assert codes == [1, 1], logs
    for log in logs:
        assert f"CheckpointError: checkpoint {state_file.parent}: the trainer's record" in log
        assert "KeyError: 'bit_generator'" in log, log[-2000:]


def test_every_rank_refuses_a_checkpoint_dir_another_run_holds(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """Only rank 0 takes the lock; the others hear its refusal, even when rank 0 waits for it
    longer than the collectives' timeout (dist_timeout_s: 2 s here, the wait 6 s)."""
    _, data = corpus
    ckpt = tmp_path / "ckpt"
    other_run = lock_checkpoint_dir(ckpt, 0)
    port = free_port()
    args = [sys.executable, *HELPER, "--dataset", str(data.path), "--checkpoint-dir", str(ckpt),
            "--out", str(tmp_path / "out"), "--steps", "2", "--lock-wait", "6",
            "--dist-timeout", "2"]
    procs = [start(args, tmp_path / f"rank{r}.log", **pod_env(r, port)) for r in (0, 1)]
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    other_run.release()
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    assert codes == [1, 1], logs
    for log in logs:
        assert f"lmcore.checkpoint_lock.CheckpointDirBusy: checkpoint_dir {ckpt} is in use by " \
               f"another training run (pid {os.getpid()} on " in log, log[-2000:]
        assert "waited 6 s" in log
    assert latest_training_state(ckpt) is None


def test_pytorchjob_master_and_worker_pods_train_to_the_end(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """Two local "pods", each with exactly the variables the training operator sets, each
    running `torchrun --nnodes 2 -m services.trainer` (torchrun reads the PET_* variables)."""
    text, data = corpus
    port = free_port()
    ckpt = tmp_path / "ckpt"
    trainer = trainer_args(text, data, ckpt, "train.max_steps=6")
    procs = []
    for rank, role in enumerate(("master", "worker")):
        log = tmp_path / f"{role}.log"
        procs.append((start([*TORCHRUN, "--nnodes", "2", *trainer], log, **pod_env(rank, port)),
                      log))  # fmt: skip
    for proc, log in procs:
        finish(proc, log)
    master_log = procs[0][1].read_text()
    assert "[rank 0]" in master_log and "step 6/6" in master_log
    assert "[rank 1]" not in master_log  # the worker logs only trouble, and in its own pod
    assert (ckpt / "model" / "model.safetensors").is_file()
    state = json.loads((ckpt / "step-00000006" / "state.json").read_text())
    assert state["extra"]["world_size"] == 2
    assert len(state["extra"]["samplers"]) == 2


def _prepare_data_on_rank(rank: int, port: int, cfg: object, dist_timeout_s: float, out: Path,
                          ready: object, first_takes_s: float) -> None:
    """One rank of a two-rank job on one node: the trainer's data step, then its verdict.
    Rank 0's tokenization lasts at least `first_takes_s` (as a big corpus's would), so what
    the test proves does not hang on how fast this machine tokenizes."""
    from lmcore import distributed as D
    from services.trainer import job
    from services.trainer.job import prepare_data

    if rank == 0 and first_takes_s:
        def slow_prepare_corpus(*args: object, **kwargs: object) -> TokenDataset:
            done_at = time.monotonic() + first_takes_s
            dataset = prepare_corpus(*args, **kwargs)  # type: ignore[arg-type]
            time.sleep(max(0.0, done_at - time.monotonic()))
            return dataset

        job.prepare_corpus = slow_prepare_corpus  # this spawned process's own module
    torch.set_num_threads(1)
    environ = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ready.wait()  # both ranks rendezvous at once, well within the short timeout
    with D.distributed("cpu", dist_timeout_s, environ) as (env, _device):
        start_s = time.monotonic()
        try:
            data = prepare_data(cfg, env, progress=False)
            verdict = {"train_tokens": len(data.train)}
        except Exception as exc:
            verdict = {"error": f"{type(exc).__name__}: {exc}"}
        verdict["seconds"] = time.monotonic() - start_s
    (out / f"rank{rank}.json").write_text(json.dumps(verdict))


def _prepare_data_on_two_ranks(tmp_path: Path, overrides: list[str], dist_timeout_s: float,
                               first_takes_s: float = 0.0) -> list[dict]:
    from services.trainer import schema

    cfg = schema.compose(["model=tiny", "data=text", f"data.cache_dir={tmp_path / 'cache'}",
                          *overrides])
    schema.validate(cfg)
    ready = mp.get_context("spawn").Barrier(2)
    mp.spawn(_prepare_data_on_rank, nprocs=2,
             args=(free_port(), cfg, dist_timeout_s, tmp_path, ready, first_takes_s))
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_other_ranks_wait_for_a_first_tokenization_longer_than_the_collective_timeout(
    tmp_path: Path,
) -> None:
    """Rank 1 waits for rank 0 to tokenize a new corpus; that wait used to be a collective
    bound by train.dist_timeout_s, so a big corpus's first preparation failed the job (and a
    PyTorchJob's restart did the same again). Here the preparation outlasts a 3 s timeout
    twice over (a timeout short enough to matter, long enough for a loaded CI machine to set
    up its groups within it)."""
    text = write_corpus(tmp_path / "corpus.txt", lines=4000)
    timeout_s = 3.0
    first, other = _prepare_data_on_two_ranks(tmp_path, [f"data.source={text}"], timeout_s,
                                              first_takes_s=2 * timeout_s + 0.5)
    assert "error" not in first and "error" not in other, (first, other)
    assert first["seconds"] > 2 * timeout_s  # the premise: a preparation that outlasts it
    assert other["seconds"] > 2 * timeout_s  # it waited
    assert first["train_tokens"] == other["train_tokens"] > 0


def test_a_corpus_error_on_the_preparing_rank_reaches_the_waiting_rank(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.txt"
    first, other = _prepare_data_on_two_ranks(tmp_path, [f"data.source={missing}"], 30)
    assert first["error"] == f"CorpusError: data.source: {missing}: no such file or directory"
    assert other["error"] == f"CorpusError: {missing}: no such file or directory"


# -- resuming on another world size (mp.spawn ranks, or this process for one rank) --------------

RESIZE_BLOCK = 32


def _fit_on_rank(rank: int, world: int, port: int, data_dir: Path, changes: dict,
                 out: Path) -> None:
    """One rank of a `world`-rank run of the tiny model; writes what fit() returned."""
    if world > 1:
        torch.set_num_threads(1)  # a spawned rank; one process leaves this process's setting
    data = TokenDataset.load(data_dir)
    model = preset("tiny", vocab_size=data.tokenizer.vocab_size, block_size=RESIZE_BLOCK)
    settings = dict(batch_size=2, max_steps=None, epochs=None, lr=3e-3, warmup_steps=2,
                    eval_interval=0, eval_batches=2, log_interval=1, checkpoint_interval=0,
                    keep_checkpoints=10, device="cpu", progress=False,
                    quantization_report=False, dist_timeout_s=60)  # fmt: skip
    settings.update(changes)
    tracker = _LrTracker()
    env = DistEnv(rank=rank, world_size=world, master_port=port)
    result = Trainer(model, TrainConfig(**settings), data, tracker, env=env).fit()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "steps": result.steps, "resumed_from": result.resumed_from,
        "final_val_loss": result.final_val_loss, "lrs": tracker.lrs}))


class _LrTracker:
    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def start_run(self, experiment: str, run_id: str | None, params: dict) -> str:
        return run_id or "resize-run"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "lr" in metrics:
            self.lrs[step] = metrics["lr"]

    def log_artifact(self, path: object, artifact_path: str | None = None) -> None:
        pass

    def log_model_dir(self, model_dir: object, register_name: str | None,
                      alias: str = "candidate") -> None:
        return None

    def end_run(self, status: str) -> None:
        pass


def fit_on(world: int, data: TokenDataset, out: Path, **changes: object) -> list[dict]:
    """fit() on `world` ranks (real gloo processes when more than one); each rank's result."""
    if world == 1:
        _fit_on_rank(0, 1, 0, data.path, changes, out)
    else:
        mp.spawn(_fit_on_rank, args=(world, free_port(), data.path, changes, out), nprocs=world)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_an_epochs_run_resumed_with_more_epochs_and_another_world_size_trains_the_new_budget(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """An epochs run is a token budget in steps of its first session's size. Resumed with
    another tokens per step, it used to take that budget from the checkpoint's total_steps,
    so a new `epochs` was ignored: the run stopped at its old length (here: trained nothing)."""
    _, data = corpus
    ckpt = tmp_path / "ckpt"
    first_step = 2 * 2 * RESIZE_BLOCK  # tokens per step: 2 ranks x 2 windows

    def epochs_of(steps: int) -> float:  # just under `steps` first-size steps of tokens
        return (steps * first_step - 1) / len(data.train)

    (r0, r1) = fit_on(2, data, tmp_path / "first", epochs=epochs_of(6),
                      checkpoint_dir=str(ckpt))  # fmt: skip
    assert r0["steps"] == r1["steps"] == 6

    # One rank, half the tokens per step, twice the epochs: the 6 steps left of the first
    # session's size are 12 of this one's.
    (again,) = fit_on(1, data, tmp_path / "again", epochs=epochs_of(12), checkpoint_dir=str(ckpt))
    assert again["resumed_from"] == 6 and again["steps"] == 18
    state = json.loads((ckpt / "step-00000018" / "state.json").read_text())["extra"]
    assert state["tokens_seen"] == 12 * first_step
    assert state["schedule"]["total_steps"] == 12  # a later resize keeps the new budget
    assert again["lrs"]["18"] == pytest.approx(3e-3 * 0.1)  # the decay ends with the run


def test_val_loss_of_the_same_weights_is_the_same_for_any_world_size_and_batch_size(
    corpus: tuple[Path, TokenDataset], tmp_path: Path
) -> None:
    """Each rank used to draw eval_batches x batch_size windows of its own stream, so a run
    resized (or given another batch size) was measured on other windows, and more or fewer of
    them: its val_loss history moved by that alone. Resuming the finished run evaluates the
    same step-4 weights again. Tolerance: 1e-5 relative, for sums taken in other batches."""
    from lmcore.checkpoint import load_model_dir
    from lmcore.data import WindowSampler

    _, data = corpus
    ckpt = str(tmp_path / "ckpt")
    (first,) = fit_on(1, data, tmp_path / "first", max_steps=4, batch_size=4,
                      checkpoint_dir=ckpt)  # fmt: skip
    # A run on its first setup is measured as before: eval_batches of its batch_size windows.
    model = load_model_dir(tmp_path / "ckpt" / "model").model
    sampler = WindowSampler(data.val, RESIZE_BLOCK, 4, seed=0)
    with torch.no_grad():
        before = sum(float(model(*sampler.next_batch())[1]) for _ in range(2)) / 2
    assert first["final_val_loss"] == pytest.approx(before, rel=1e-5)

    two = fit_on(2, data, tmp_path / "two", max_steps=4, batch_size=3, checkpoint_dir=ckpt)
    eight = fit_on(1, data, tmp_path / "eight", max_steps=4, batch_size=8, checkpoint_dir=ckpt)
    for result in (*two, *eight):
        assert result["resumed_from"] == 4 and result["steps"] == 4  # the same weights
        assert result["final_val_loss"] == pytest.approx(first["final_val_loss"], rel=1e-5)
