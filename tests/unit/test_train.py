"""lmcore.train (the schedule in a run, AdamW, accumulation, eval, checkpoints, SIGTERM),
lmcore.distributed."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmcore import train as train_module
from lmcore.checkpoint import CheckpointError, load_model_dir, save_model_dir
from lmcore.config import ConfigError, preset
from lmcore.data import TokenDataset, WindowSampler, prepare_corpus
from lmcore.distributed import DistEnv, DistributedEnvError
from lmcore.model import Transformer
from lmcore.registry import ModelVersionInfo
from lmcore.schedule import lr_at
from lmcore.train import (
    INTERRUPTED_EXIT_CODE,
    Trainer,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    make_optimizer,
)
from lmcore.train_state import latest_training_state, list_training_states
from tests.helpers.trainer_run import RecordingTracker, UnionSampler, write_corpus

pytestmark = pytest.mark.unit

BLOCK = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> TokenDataset:
    root = tmp_path_factory.mktemp("corpus")
    corpus = write_corpus(root / "corpus.txt", lines=6000)
    return prepare_corpus(corpus, root / "cache", vocab_size=512, progress=False)


def tiny(dataset: TokenDataset):  # noqa: ANN201
    return preset("tiny", vocab_size=dataset.tokenizer.vocab_size, block_size=BLOCK)


def config(tmp_path: Path | None = None, **changes: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        batch_size=4, max_steps=6, lr=3e-3, warmup_steps=2, eval_interval=0, eval_batches=2,
        log_interval=1, checkpoint_interval=0, device="cpu", progress=False,
        checkpoint_dir=str(tmp_path / "ckpt") if tmp_path else None,
    )
    base.update(changes)
    return TrainConfig(**base)


def step_clock(monkeypatch: pytest.MonkeyPatch,
               step_s: Callable[[Trainer, int], float] = lambda trainer, n: 1 / 128) -> list[float]:
    """Give the trainer a clock that only its optimizer steps advance: its n-th step (from 1)
    takes `step_s(trainer, n)` seconds. A budget run's steps and LRs are then exact on any
    machine (on the wall clock a slow step on a busy CI machine moved them). Returns the list
    each step's LR is appended to."""
    optimizer_step, lrs = Trainer._optimizer_step, []

    def timed_step(self: Trainer, lr: float) -> Any:
        lrs.append(lr)
        out = optimizer_step(self, lr)
        self.virtual_s = getattr(self, "virtual_s", 0.0) + step_s(self, len(lrs))
        return out

    monkeypatch.setattr(Trainer, "_optimizer_step", timed_step)
    monkeypatch.setattr(Trainer, "_elapsed",
                        lambda self: self.schedule.elapsed_before + getattr(self, "virtual_s", 0.0))
    return lrs


class ListTracker:
    """Keeps every call in memory (single process)."""

    def __init__(self, run_id: str = "run-1") -> None:
        self.calls: list[tuple[str, Any]] = []
        self.new_id = run_id
        self.on_metrics = None

    def start_run(self, experiment: str, run_id: str | None, params: dict[str, Any]) -> str:
        self.calls.append(("start_run", run_id))
        return run_id or self.new_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append(("log_metrics", (step, dict(metrics))))
        if self.on_metrics:
            self.on_metrics(step, metrics)

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
        self.calls.append(("log_artifact", path))

    def log_model_dir(self, model_dir: Any, register_name: str | None,
                      alias: str = "candidate") -> Any:
        self.calls.append(("log_model_dir", (str(model_dir), register_name, alias)))
        started = [run for call, run in self.calls if call == "start_run"]
        run_id = started[-1] or self.new_id if started else None
        return ModelVersionInfo(register_name, "1", run_id, f"models:/{register_name}/1")

    def end_run(self, status: str) -> None:
        self.calls.append(("end_run", status))

    def metrics(self) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for name, value in self.calls:
            if name == "log_metrics":
                out.setdefault(value[0], {}).update(value[1])
        return out


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# -- the schedule in a run, and the optimizer ------------------------------------------------------


def test_a_warmup_longer_than_the_budget_allows_still_ends_at_min_lr_and_says_so(
    dataset: TokenDataset, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    step_clock(monkeypatch)
    tracker = ListTracker()
    cfg = config(max_steps=100_000, warmup_steps=100_000, max_time_s=1.5,
                 quantization_report=False)
    with caplog.at_level("WARNING", logger="lmcore.train"):
        result = Trainer(tiny(dataset), cfg, dataset, tracker).fit()
    assert result.stopped_by_time and result.steps == 192  # 1.5 s of 1/128 s steps
    lrs = [m["lr"] for _, m in sorted(tracker.metrics().items()) if "lr" in m]
    min_lr = cfg.lr * cfg.min_lr_ratio
    assert max(lrs) > 0.9 * cfg.lr  # warmed up to the peak ...
    assert lrs[-1] - min_lr < 0.05 * (cfg.lr - min_lr)  # ... and decayed with the time
    assert "warmup_steps=100000" in caplog.text


def test_a_slow_first_step_does_not_bring_the_budgets_decay_forward(
    dataset: TokenDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first step as slow as a compiling one: the pace counting it would say the budget
    allows two steps, and the LR would fall to min_lr at step 2. A clock that the steps alone
    advance (1 s for the first, then 1/128 s each) makes the steps and the LR the same on any
    machine: on the wall clock, a slow second step on a busy CI machine pulled the decay in."""
    calls = step_clock(monkeypatch, lambda trainer, n: 1.0 if n == 1 else 1 / 128)
    cfg = config(max_steps=100_000, warmup_steps=0, max_time_s=2.0, quantization_report=False)
    result = Trainer(tiny(dataset), cfg, dataset, ListTracker()).fit()
    assert result.stopped_by_time and len(calls) == 129  # the first second, then 128 steps
    assert calls[0] == pytest.approx(cfg.lr) and calls[1] == pytest.approx(cfg.lr)
    # From the pace of the steps after the first, the cosine is fitted to the 129 steps.
    assert calls[2:] == pytest.approx([lr_at(s - 1, cfg, 129) for s in range(3, 130)])
    assert calls[len(calls) // 4] > 0.8 * cfg.lr  # still near the top a quarter of the way in


def test_a_budget_run_resumed_with_slower_steps_fits_its_decay_to_its_own_pace(
    dataset: TokenDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed with 4x the accumulation (a resize from 4 ranks to 1 keeping the global batch),
    each step takes 4x as long. The budget's pace used to count the first session's fast steps
    for good, so it expected far more steps than the budget allows: the LR stayed high and the
    decay was crammed into the last steps. A clock that the steps alone advance (1/128 s per
    micro-step, exact in binary) makes the steps and the LR the same on any machine."""
    step_clock(monkeypatch, lambda trainer, n: trainer.cfg.grad_accum_steps / 128)
    common = dict(max_steps=100_000, warmup_steps=0, quantization_report=False)
    first = Trainer(tiny(dataset), config(tmp_path, max_time_s=1.0, **common), dataset,
                    ListTracker()).fit()  # fmt: skip
    assert first.steps == 128  # 1 s of 1/128 s steps

    tracker = ListTracker()
    cfg = config(tmp_path, max_time_s=2.0, grad_accum_steps=4, **common)
    resumed = Trainer(tiny(dataset), cfg, dataset, tracker).fit()
    assert resumed.steps == 160  # the second second holds 32 steps of 1/32 s
    lrs = {s: m["lr"] for s, m in tracker.metrics().items() if "lr" in m}
    # The session's first steps go by the old pace until it has timed one of its own; from
    # then on the cosine is fitted to the 160 steps the budget allows.
    assert lrs[129] > lrs[130] > lrs[131]
    assert [lrs[s] for s in range(131, 161)] == pytest.approx(
        [lr_at(s - 1, cfg, 160) for s in range(131, 161)])
    assert lrs[160] == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    state = json.loads((tmp_path / "ckpt" / "step-00000160" / "state.json").read_text())
    assert state["extra"]["pace"] == [31, 31 / 32]  # this session's own steps after its first
    assert state["extra"]["pace_setup"]["grad_accum_steps"] == 4


def test_lr_is_stepped_per_optimizer_step_not_per_micro_batch(
    dataset: TokenDataset,
) -> None:
    tracker = ListTracker()
    cfg = config(grad_accum_steps=3, max_steps=5, warmup_steps=2)
    Trainer(tiny(dataset), cfg, dataset, tracker).fit()
    logged = {step: m["lr"] for step, m in tracker.metrics().items() if "lr" in m}
    assert logged == {s: pytest.approx(lr_at(s - 1, cfg, 5)) for s in range(1, 6)}


def test_an_epochs_run_resumed_with_bigger_steps_keeps_its_token_budget_and_lr_curve(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    """Resumed with twice the tokens per step (a batch or world size doubled), the run trains
    the tokens its epochs left and each step takes the LR of the tokens it has reached."""
    import shutil

    twelve_steps = 12 * 4 * BLOCK / len(dataset.train)
    common = dict(max_steps=None, epochs=twelve_steps, checkpoint_interval=4,
                  keep_checkpoints=10, quantization_report=False)  # fmt: skip
    straight = ListTracker()
    whole = Trainer(tiny(dataset), config(tmp_path / "a", **common), dataset, straight).fit()
    assert whole.steps == 12
    (tmp_path / "b" / "ckpt").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "ckpt" / "step-00000004",
                    tmp_path / "b" / "ckpt" / "step-00000004")  # fmt: skip

    resumed = ListTracker()
    cfg = config(tmp_path / "b", batch_size=8, **common)
    result = Trainer(tiny(dataset), cfg, dataset, resumed).fit()

    assert result.steps == 8  # 4 steps of 4 windows, then 4 of 8: the 48 windows of 12 steps
    lrs, straight_lrs = ({s: m["lr"] for s, m in t.metrics().items() if "lr" in m}
                         for t in (resumed, straight))  # fmt: skip
    assert [lrs[s] for s in range(5, 9)] == pytest.approx([straight_lrs[s] for s in (5, 7, 9, 11)])
    metadata = json.loads((tmp_path / "b" / "ckpt" / "model" / "config.json").read_text())
    assert metadata.get("metadata", metadata)["tokens_seen"] == 48 * BLOCK


def test_an_epochs_run_resumed_again_at_its_first_step_size_still_counts_by_tokens(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    """4 steps of 4 windows, 2 of 8, then back to 4: the third session starts 32 windows in
    (8 first-size steps), not at its step number 6, and stops at the run's 48 windows."""
    import shutil

    twelve_steps = 12 * 4 * BLOCK / len(dataset.train)
    common = dict(max_steps=None, epochs=twelve_steps, keep_checkpoints=10,
                  quantization_report=False)  # fmt: skip
    straight = ListTracker()
    Trainer(tiny(dataset), config(tmp_path / "a", checkpoint_interval=4, **common), dataset,
            straight).fit()  # fmt: skip
    for session in ("b", "c"):
        (tmp_path / session / "ckpt").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "ckpt" / "step-00000004",
                    tmp_path / "b" / "ckpt" / "step-00000004")  # fmt: skip
    Trainer(tiny(dataset), config(tmp_path / "b", batch_size=8, checkpoint_interval=2, **common),
            dataset, ListTracker()).fit()  # fmt: skip
    shutil.copytree(tmp_path / "b" / "ckpt" / "step-00000006",
                    tmp_path / "c" / "ckpt" / "step-00000006")  # fmt: skip

    third = ListTracker()
    result = Trainer(tiny(dataset), config(tmp_path / "c", checkpoint_interval=4, **common),
                     dataset, third).fit()  # fmt: skip

    assert result.steps == 10  # 32 windows by step 6, then 4 steps of 4
    lrs, straight_lrs = ({s: m["lr"] for s, m in t.metrics().items() if "lr" in m}
                         for t in (third, straight))  # fmt: skip
    assert [lrs[s] for s in range(7, 11)] == pytest.approx([straight_lrs[s] for s in range(9, 13)])
    metadata = json.loads((tmp_path / "c" / "ckpt" / "model" / "config.json").read_text())
    assert metadata.get("metadata", metadata)["tokens_seen"] == 48 * BLOCK


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"max_steps": 10, "epochs": 1.0}, "epochs"), ({"lr": -1.0}, "lr"),
     ({"batch_size": 0}, "batch_size"), ({"mixed_precision": "fp8"}, "mixed_precision"),
     ({"max_steps": None}, "epochs"), ({"max_time_s": 0}, "max_time_s"),
     ({"lr": math.inf}, "lr"), ({"epochs": math.inf, "max_steps": None}, "epochs"),
     ({"dist_timeout_s": 0}, "dist_timeout_s"), ({"dist_timeout_s": -5.0}, "dist_timeout_s"),
     ({"device": "meta"}, "device"), ({"grad_clip": math.inf}, "grad_clip"),
     ({"checkpoint_lock_wait_s": -1}, "checkpoint_lock_wait_s"),
     ({"checkpoint_lock_wait_s": math.inf}, "checkpoint_lock_wait_s"),
     ({"checkpoint_lock_wait_s": 1e10}, "checkpoint_lock_wait_s")],
)
def test_bad_train_config_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**changes)


def test_a_diverged_run_fails_unpublished_and_leaves_no_checkpoint_of_its_weights(
    tmp_path: Path, dataset: TokenDataset
) -> None:
    # A huge lr turns the weights, then the validation loss, non-finite. Registered, the model
    # would be promoted like any other; checkpointed, a resume would carry on from garbage.
    tracker = ListTracker()
    trainer = Trainer(tiny(dataset), config(tmp_path, lr=1e30, warmup_steps=0), dataset, tracker,
                      register_name="llm")  # fmt: skip
    with pytest.raises(TrainingDiverged, match="validation loss nan at step 6"):
        trainer.fit()
    names = [name for name, _ in tracker.calls]
    assert "log_model_dir" not in names and tracker.calls[-1] == ("end_run", "FAILED")
    assert latest_training_state(tmp_path / "ckpt") is None
    assert not (tmp_path / "ckpt" / "model").exists()


def test_checkpoints_between_evaluations_never_hold_diverged_weights(
    tmp_path: Path, dataset: TokenDataset
) -> None:
    # No evaluation before the end: the interval checkpoints check the weights themselves.
    cfg = config(tmp_path, lr=1e30, warmup_steps=0, eval_interval=0, checkpoint_interval=1)
    trainer = Trainer(tiny(dataset), cfg, dataset, ListTracker())
    with pytest.raises(TrainingDiverged, match="non-finite weights at step"):
        trainer.fit()
    kept = sorted((tmp_path / "ckpt").glob("step-*"))
    assert 1 <= len(kept) < 6  # the finite ones before it diverged; it stopped before the end
    for path in kept:
        tensors = load_file(path / "model.safetensors")
        assert all(t.isfinite().all() for t in tensors.values()), path


def test_weight_decay_applies_to_matrices_only() -> None:
    model = Transformer(preset("tiny"))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["params"]
    assert opt.defaults["fused"]  # the fused kernel on CPU as on CUDA
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())  # tied head counted once


# -- training behaviour -------------------------------------------------------------------------


def test_training_lowers_validation_loss_and_reports_cpu_metrics(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    tracker = ListTracker()
    cfg = config(tmp_path, max_steps=30, eval_interval=10, warmup_steps=5)
    result = Trainer(tiny(dataset), cfg, dataset, tracker).fit()
    val = [v for _, v in result.history["val_loss"]]
    assert val[-1] < val[0] - 0.5
    assert result.final_val_loss == pytest.approx(val[-1])
    assert result.steps == 30 and result.tokens_per_s > 0
    last = tracker.metrics()[30]
    assert {"train_loss", "val_loss", "val_perplexity", "lr", "grad_norm", "tokens_per_s",
            "data_time_share"} <= set(last)
    assert last["val_perplexity"] == pytest.approx(math.exp(last["val_loss"]), rel=1e-6)
    assert "mfu" not in last and "gpu_mem_gb" not in last  # MFU is reported on CUDA only


def test_an_intervals_tokens_per_s_leaves_out_the_evaluation_before_it(
    dataset: TokenDataset,
) -> None:
    pause_s = 1.0
    tracker = ListTracker()
    # An evaluation that takes a second: rank 0 logs its val loss inside it.
    tracker.on_metrics = lambda _step, m: time.sleep(pause_s) if "val_loss" in m else None
    cfg = config(max_steps=10, log_interval=5, eval_interval=5, quantization_report=False)
    result = Trainer(tiny(dataset), cfg, dataset, tracker).fit()
    # Steps 6-10 came after the evaluation at step 5: their time is training time alone.
    tokens = 5 * cfg.batch_size * BLOCK
    assert tokens / tracker.metrics()[10]["tokens_per_s"] < pause_s
    # So is the run's rate (steps 2-10, after the first step's warm-up).
    assert 9 * cfg.batch_size * BLOCK / result.tokens_per_s < pause_s


def test_bf16_on_cpu_trains_under_autocast_with_fp32_weights_and_no_scaler(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    # The int8 report measures the fp32 model on purpose; it is not the training being checked.
    cfg = config(tmp_path, max_steps=30, eval_interval=10, warmup_steps=5, mixed_precision="bf16",
                 quantization_report=False)  # fmt: skip
    tracker = ListTracker()
    trainer = Trainer(tiny(dataset), cfg, dataset, tracker)
    seen: set[torch.dtype] = set()

    def watch_an_mlp(step: int, _metrics: dict[str, float]) -> None:
        if step == 1:  # the model exists once fit() has set it up
            up = trainer.model.blocks[0].mlp.up
            up.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))

    tracker.on_metrics = watch_an_mlp
    result = trainer.fit()

    assert trainer.precision.name == "bf16" and not trainer.scaler.is_enabled()
    assert seen == {torch.bfloat16}  # the matmuls ran in bf16, training and evaluation alike
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # master weights
    val = [v for _, v in result.history["val_loss"]]
    assert val[-1] < val[0] - 0.5


def test_gradient_accumulation_matches_one_big_batch(dataset: TokenDataset) -> None:
    """2 micro-steps of b windows == 1 step of the same 2b windows (fp32 on CPU)."""

    def run(batch: int, accum: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        def factory(tokens, block, b, seed, rank, world):  # noqa: ANN001, ANN202
            if accum == 1:  # the union of the two micro-batches, in the same order
                return UnionSampler(tokens, block, b // 2, seed, 2)
            return _Alternating(UnionSampler(tokens, block, b, seed, 2))

        cfg = config(batch_size=batch, grad_accum_steps=accum, max_steps=1, warmup_steps=0)
        tracker = ListTracker()
        trainer = Trainer(tiny(dataset), cfg, dataset, tracker, sampler_factory=factory)
        trainer.fit()
        return weights(trainer), tracker.metrics()[1]

    (big, big_m), (acc, acc_m) = run(8, 1), run(4, 2)
    # Loss and gradient norm are scale-sensitive (Adam's update is not): they prove the
    # micro-batch losses are averaged, not summed.
    assert acc_m["train_loss"] == pytest.approx(big_m["train_loss"], rel=1e-5)
    assert acc_m["grad_norm"] == pytest.approx(big_m["grad_norm"], rel=1e-4)
    lr = 3e-3
    for name in big:
        # Adam's first step moves each weight by about lr * sign(g); summation order only
        # matters where |g| is near eps, so updates agree to 1% of the step size.
        torch.testing.assert_close(acc[name], big[name], atol=1e-2 * lr, rtol=0)


class _Alternating:
    """Hands out the two rank-halves of a UnionSampler batch as two consecutive micro-batches."""

    def __init__(self, union: UnionSampler) -> None:
        self.parts = union.parts

    def next_batch(self):  # noqa: ANN201
        self._i = getattr(self, "_i", -1) + 1
        return self.parts[self._i % 2].next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def test_final_model_dir_carries_metadata_and_goes_to_the_tracker(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    tracker = ListTracker("run-xyz")
    cfg = config(tmp_path, max_steps=4)
    result = Trainer(tiny(dataset), cfg, dataset, tracker, register_name="llm-test",
                     run_params={"model": {"name": "tiny"}}).fit()
    assert result.model_dir == tmp_path / "ckpt" / "model"
    loaded = load_model_dir(result.model_dir)
    assert loaded.metadata["step"] == 4 and loaded.metadata["run_id"] == "run-xyz"
    assert loaded.metadata["ended_by"] == "steps"
    assert loaded.metadata["val_loss"] == pytest.approx(result.final_val_loss)
    assert loaded.metadata["config"] == {"model": {"name": "tiny"}}
    assert loaded.tokenizer is not None
    assert ("log_model_dir", (str(result.model_dir), "llm-test", "candidate")) in tracker.calls
    assert tracker.calls[-1] == ("end_run", "FINISHED")
    want = ModelVersionInfo("llm-test", "1", "run-xyz", "models:/llm-test/1")
    assert result.model_version == want


def snapshot(root: Path) -> list[tuple[str, bytes | None]]:
    """Every path under `root` with its bytes (None for a dir): what a refusal must leave."""
    return sorted((str(p), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def test_a_model_dir_over_a_folder_of_other_files_is_refused_before_training(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    """The run trained, then published by swapping the folder out and deleting it whole."""
    models = tmp_path / "my-models"
    save_model_dir(models / "older-model", Transformer(tiny(dataset)))
    (models / "notes.txt").write_text("weeks of work")
    before = snapshot(models)
    tracker = ListTracker()
    cfg = config(tmp_path, max_steps=2, model_dir=str(models))
    with pytest.raises(ConfigError, match=re.escape(f"model_dir {models}: exists and is not a "
                                                    "model dir (it holds notes.txt, older-model)")):
        Trainer(tiny(dataset), cfg, dataset, tracker).fit()
    assert snapshot(models) == before
    assert tracker.calls == [] and not (tmp_path / "ckpt").exists()  # refused before any step


@pytest.mark.parametrize("where", ["checkpoint-dir", "its-parent", "inside-a-checkpoint"])
def test_a_model_dir_overlapping_the_checkpoints_is_refused_before_training(
    dataset: TokenDataset, tmp_path: Path, where: str
) -> None:
    """model_dir = checkpoint_dir resumed, trained, then published over every checkpoint."""
    ckpt = tmp_path / "ckpt"
    Trainer(tiny(dataset), config(tmp_path, max_steps=2, checkpoint_interval=1,
                                  quantization_report=False), dataset).fit()  # fmt: skip
    before = snapshot(ckpt)
    model_dir = {"checkpoint-dir": ckpt, "its-parent": tmp_path,
                 "inside-a-checkpoint": ckpt / "step-00000002" / "model"}[where]  # fmt: skip
    cfg = config(tmp_path, max_steps=4, model_dir=str(model_dir), quantization_report=False)
    with pytest.raises(ConfigError, match=re.escape(f"model_dir {model_dir} ")):
        Trainer(tiny(dataset), cfg, dataset).fit()
    assert snapshot(ckpt) == before
    assert [p.name for p in list_training_states(ckpt)] == ["step-00000001", "step-00000002"]


def test_a_model_dir_overlapping_the_token_data_is_refused_before_training(
    tmp_path: Path,
) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt", lines=600)
    data = prepare_corpus(corpus, tmp_path / "cache", vocab_size=300, progress=False)
    before = snapshot(data.path)
    for model_dir in (data.path, data.path.parent, data.path / "model"):
        cfg = config(tmp_path, max_steps=2, model_dir=str(model_dir))
        with pytest.raises(ConfigError, match=re.escape(f"model_dir {model_dir} ")):
            Trainer(tiny(data), cfg, data).fit()
    assert snapshot(data.path) == before


def test_a_rerun_replaces_the_model_dir_of_the_run_before(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    model_dir = tmp_path / "models" / "final"
    for steps in (2, 4):  # the second run resumes the first's checkpoint, trains on, publishes
        cfg = config(tmp_path, max_steps=steps, model_dir=str(model_dir),
                     quantization_report=False)  # fmt: skip
        assert Trainer(tiny(dataset), cfg, dataset).fit().model_dir == model_dir
        assert load_model_dir(model_dir).metadata["step"] == steps
    assert [p.name for p in model_dir.parent.iterdir()] == ["final"]


def test_final_model_dir_reports_its_int8_size_and_val_loss_change(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    tracker = ListTracker("run-q")
    result = Trainer(tiny(dataset), config(tmp_path, max_steps=30), dataset, tracker).fit()
    report = load_model_dir(result.model_dir).metadata["quantization"]

    # Every weight in int8, the tied table included; the norms and positions stay fp32 (~0.31x).
    assert report["int8_bytes"] < 0.35 * report["base_bytes"]
    assert report["int8_size_ratio"] == pytest.approx(report["int8_bytes"] / report["base_bytes"])
    # Rounding the weights to int8 changes the loss a little, not a lot.
    assert 0 < abs(report["int8_val_loss_delta"]) < 0.05 * report["base_val_loss"]
    assert report["dynamic_int8_bytes"] < report["base_bytes"]  # trained on CPU: measured too
    assert report["windows"] == 2  # eval_batches fixed windows
    final = tracker.metrics()[result.steps]
    assert final["quant_int8_val_loss_delta"] == report["int8_val_loss_delta"]


@pytest.mark.gpu
def test_the_int8_report_of_a_cuda_run_measures_weight_only_int8(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    result = Trainer(tiny(dataset), config(tmp_path, max_steps=3, device="cuda"), dataset,
                     ListTracker("run-gpu")).fit()  # fmt: skip
    report = load_model_dir(result.model_dir).metadata["quantization"]
    assert report["int8_bytes"] < 0.8 * report["base_bytes"]
    assert abs(report["int8_val_loss_delta"]) < 0.05 * report["base_val_loss"]
    assert "dynamic_int8_bytes" not in report  # PyTorch's dynamic int8 runs on CPU only


def test_a_torch_without_dynamic_int8_still_reports_weight_only_int8(
    dataset: TokenDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.ao.quantization

    monkeypatch.delattr(torch.ao.quantization, "quantize_dynamic")  # as a later torch may
    result = Trainer(tiny(dataset), config(tmp_path, max_steps=2), dataset,
                     ListTracker("run-nd")).fit()  # fmt: skip
    report = load_model_dir(result.model_dir).metadata["quantization"]
    assert report["int8_bytes"] < report["base_bytes"]
    assert not any(key.startswith("dynamic_") for key in report)


def test_the_int8_report_can_be_switched_off(dataset: TokenDataset, tmp_path: Path) -> None:
    tracker = ListTracker("run-nq")
    cfg = config(tmp_path, max_steps=2, quantization_report=False)
    result = Trainer(tiny(dataset), cfg, dataset, tracker).fit()
    assert "quantization" not in load_model_dir(result.model_dir).metadata
    assert not any(k.startswith("quant_") for m in tracker.metrics().values() for k in m)


def test_checkpoint_holds_run_id_sampler_and_rng_state(
    dataset: TokenDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng_at_save: dict[int, torch.Tensor] = {}
    save = train_module.save_training_state

    def save_noting_the_rng(ckpt_dir: Any, step: int, **kwargs: Any) -> Path:
        rng_at_save[step] = torch.get_rng_state()
        return save(ckpt_dir, step, **kwargs)

    monkeypatch.setattr(train_module, "save_training_state", save_noting_the_rng)
    # Dropout on, so the RNG state moves from one checkpoint to the next.
    Trainer(tiny(dataset).replace(dropout=0.1),
            config(tmp_path, max_steps=4, checkpoint_interval=2), dataset,
            ListTracker("run-ck")).fit()
    latest = latest_training_state(tmp_path / "ckpt")
    assert latest is not None and latest.name == "step-00000004"
    assert sorted(rng_at_save) == [2, 4]
    assert not torch.equal(rng_at_save[2], rng_at_save[4])
    for step, want in rng_at_save.items():
        rngs = load_file(tmp_path / "ckpt" / f"step-{step:08d}" / "extra_tensors.safetensors")
        assert rngs.keys() == {"rng.cpu.0"}  # one rank, no CUDA
        assert torch.equal(rngs["rng.cpu.0"], want), f"step {step}: not the RNG state at save"
    state = json.loads((latest / "state.json").read_text())
    extra = state["extra"]
    assert extra["run_id"] == "run-ck" and extra["world_size"] == 1
    assert extra["samplers"][0]["batches_drawn"] == 4
    assert extra["schedule"]["total_steps"] == 4
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.1
    # What it was trained on, so a resume can refuse another corpus, tokenizer or model.
    assert extra["data"]["cache_key"] == dataset.meta["cache_key"]
    assert extra["data"]["content_hash"] == dataset.meta["content_hash"]
    assert extra["data"]["tokenizer_sha256"] == hashlib.sha256(
        dataset.tokenizer.to_str().encode()).hexdigest()
    assert extra["model_config"] == tiny(dataset).replace(dropout=0.1).to_dict()


# -- SIGTERM and resume -------------------------------------------------------------------------


def test_sigterm_saves_and_a_restart_ends_with_the_same_weights(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    # Dropout on: bit-identical weights then need the RNG state back as well as the rest.
    model_config = tiny(dataset).replace(dropout=0.1)
    straight = Trainer(model_config, config(tmp_path / "a", max_steps=8), dataset)
    straight.fit()

    tracker = ListTracker("run-resumed")

    def kill_at_step_3(step: int, metrics: dict[str, float]) -> None:
        if step == 3 and "train_loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled at the step boundary

    tracker.on_metrics = kill_at_step_3
    cfg = config(tmp_path / "b", max_steps=8)
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(model_config, cfg, dataset, tracker).fit()
    assert info.value.step == 3 and info.value.exit_code == INTERRUPTED_EXIT_CODE
    assert ("end_run", "KILLED") in tracker.calls
    assert latest_training_state(tmp_path / "b" / "ckpt").name == "step-00000003"

    tracker.on_metrics = None
    resumed = Trainer(model_config, cfg, dataset, tracker)
    result = resumed.fit()
    assert result.resumed_from == 3 and result.steps == 8
    assert ("start_run", "run-resumed") in tracker.calls  # the same run carries on
    for name, value in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[name], value, atol=0, rtol=0)


def test_a_sigterm_after_the_last_step_skips_the_registration_and_a_rerun_registers(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    """A SIGTERM after the loop's last stop vote (here: during the final evaluation) was only
    noted: the registration ran anyway, and with MLflow down retried for 15 minutes past a
    pod's grace period. Now the run stops as on any SIGTERM, its model saved but not
    registered; the same command run again registers it without training."""
    tracker = ListTracker()

    def sigterm_at_the_final_eval(step: int, metrics: dict[str, float]) -> None:
        if "val_loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)

    tracker.on_metrics = sigterm_at_the_final_eval
    cfg = config(tmp_path, max_steps=4, quantization_report=False)
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(tiny(dataset), cfg, dataset, tracker).fit()
    final = tmp_path / "ckpt" / "step-00000004"
    assert info.value.step == 4 and info.value.checkpoint == final
    assert "log_model_dir" not in [c for c, _ in tracker.calls]
    assert tracker.calls[-1] == ("end_run", "KILLED")
    assert load_model_dir(tmp_path / "ckpt" / "model").metadata["step"] == 4
    assert not (final / "published.json").exists()

    tracker.on_metrics = None
    again = Trainer(tiny(dataset), cfg, dataset, tracker).fit()
    assert again.resumed_from == 4 and again.steps == 4
    assert [c for c, _ in tracker.calls].count("log_model_dir") == 1
    assert tracker.calls[-1] == ("end_run", "FINISHED")
    assert (final / "published.json").exists()


def test_a_time_budget_ends_the_run_on_time_with_the_lr_decayed_and_the_model_published(
    dataset: TokenDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step_clock(monkeypatch)
    tracker = ListTracker()
    cfg = config(tmp_path, max_steps=100_000, max_time_s=1.5)
    result = Trainer(tiny(dataset), cfg, dataset, tracker).fit()
    assert result.stopped_by_time and result.steps == 192  # 1.5 s of 1/128 s steps
    assert result.elapsed_s == 1.5
    lrs = [m["lr"] for _, m in sorted(tracker.metrics().items()) if "lr" in m]
    assert len(lrs) == result.steps
    decay = lrs[cfg.warmup_steps:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    min_lr = cfg.lr * cfg.min_lr_ratio
    assert lrs[-1] - min_lr < 0.05 * (cfg.lr - min_lr)  # the cosine ran out with the time
    metadata = load_model_dir(result.model_dir).metadata
    assert metadata["step"] == result.steps and metadata["ended_by"] == "time"
    assert metadata["train_time_s"] >= 1.5
    assert math.isfinite(result.final_val_loss)

    # The checkpoint carries the time spent: a resumed run counts it, and with its budget
    # spent already trains no step.
    state = json.loads((latest_training_state(tmp_path / "ckpt") / "state.json").read_text())
    assert state["extra"]["elapsed_s"] >= 1.5
    resumed = Trainer(tiny(dataset), cfg, dataset, ListTracker()).fit()
    assert resumed.resumed_from == result.steps and resumed.steps == result.steps
    assert resumed.stopped_by_time and resumed.elapsed_s >= state["extra"]["elapsed_s"]


def test_rerunning_a_finished_time_budget_run_trains_no_step_and_registers_nothing_new(
    dataset: TokenDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train=cpu` sets max_time_s, so the default training command is a budget run. Run
    again, it resumed the checkpoint whose budget was spent, trained one more step and
    registered that step's model as a new version (moving `candidate`), at every rerun."""
    step_clock(monkeypatch)
    cfg = config(tmp_path, max_steps=100_000, max_time_s=1.0, quantization_report=False)
    first_tracker = ListTracker()
    first = Trainer(tiny(dataset), cfg, dataset, first_tracker).fit()
    assert first.stopped_by_time and first.steps == 128
    assert [c for c, _ in first_tracker.calls].count("log_model_dir") == 1
    for _ in range(2):
        tracker = ListTracker()
        again = Trainer(tiny(dataset), cfg, dataset, tracker).fit()
        assert again.resumed_from == first.steps and again.steps == first.steps
        assert again.stopped_by_time
        names = [c for c, _ in tracker.calls]
        assert "log_model_dir" not in names  # the published record answers for this step
        assert again.model_version == first.model_version  # what the first run returned
        assert not any("train_loss" in m for m in tracker.metrics().values())
    assert [p.name for p in (tmp_path / "ckpt").glob("step-*")] == [f"step-{first.steps:08d}"]
    assert load_model_dir(tmp_path / "ckpt" / "model").metadata["step"] == first.steps


def test_a_rerun_whose_publish_record_is_nested_too_deep_publishes_again(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    """json.loads raises RecursionError for such a file, which the record's reader (and the
    model dir's) let out: the rerun failed instead of publishing again."""
    cfg = config(tmp_path, max_steps=2, quantization_report=False)
    first = Trainer(tiny(dataset), cfg, dataset, ListTracker()).fit()
    (tmp_path / "ckpt" / f"step-{first.steps:08d}" / "published.json").write_bytes(b"[" * 100_000)
    tracker = ListTracker()
    again = Trainer(tiny(dataset), cfg, dataset, tracker).fit()
    assert again.resumed_from == first.steps and again.steps == first.steps
    assert [c for c, _ in tracker.calls].count("log_model_dir") == 1
    (tmp_path / "ckpt" / "model" / "config.json").write_bytes(b"[" * 100_000)
    assert not train_module._model_dir_holds(tmp_path / "ckpt" / "model", first.steps, "run-1")


def test_sigterm_handler_is_restored_after_fit(dataset: TokenDataset) -> None:
    before = signal.getsignal(signal.SIGTERM)
    Trainer(tiny(dataset), config(max_steps=1), dataset).fit()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.fixture(scope="module")
def other_corpus(dataset: TokenDataset, tmp_path_factory: pytest.TempPathFactory) -> TokenDataset:
    """Other text under the same tokenizer: the same model config fits it, nothing else."""
    root = tmp_path_factory.mktemp("other-corpus")
    corpus = write_corpus(root / "corpus.txt", lines=6000, seed=1)
    return prepare_corpus(corpus, root / "cache", tokenizer=dataset.tokenizer, progress=False)


def test_resume_refuses_a_checkpoint_of_another_corpus_and_says_how_to_go_on(
    dataset: TokenDataset, other_corpus: TokenDataset, tmp_path: Path
) -> None:
    """The same model name (checkpoint_dir) with a new corpus used to resume the old run's
    newest checkpoint, train 0 steps and publish its weights with the new tokenizer."""
    Trainer(tiny(dataset), config(tmp_path, max_steps=2), dataset).fit()
    tracker = ListTracker()
    with pytest.raises(ConfigError) as info:
        Trainer(tiny(other_corpus), config(tmp_path, max_steps=2), other_corpus, tracker).fit()
    message = str(info.value)
    assert "step-00000002" in message and "cache_key" in message
    assert dataset.meta["cache_key"] in message and other_corpus.meta["cache_key"] in message
    assert "tokenizer_sha256" not in message  # the same tokenizer: only what differs is named
    assert "train.checkpoint_dir" in message and "train.resume=false" in message
    assert tracker.calls == []  # refused before a run was started or anything published
    assert latest_training_state(tmp_path / "ckpt").name == "step-00000002"


def test_resume_refuses_a_checkpoint_of_another_model_config(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    Trainer(tiny(dataset), config(tmp_path, max_steps=2), dataset).fit()
    other = tiny(dataset).replace(dropout=0.1)  # same shapes: the weights would load
    with pytest.raises(ConfigError, match=r"dropout 0\.0 \(this run: 0\.1\)"):
        Trainer(other, config(tmp_path, max_steps=2), dataset).fit()


def test_resume_refuses_a_checkpoint_that_does_not_say_what_it_was_trained_on(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    Trainer(tiny(dataset), config(tmp_path, max_steps=2), dataset).fit()
    state_file = latest_training_state(tmp_path / "ckpt") / "state.json"
    state = json.loads(state_file.read_text())
    del state["extra"]["data"]  # as a checkpoint written before it was recorded
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="does not record the data"):
        Trainer(tiny(dataset), config(tmp_path, max_steps=2), dataset).fit()


@pytest.mark.parametrize(("damage", "named"), [
    (lambda extra: extra.update(samplers=[{"rank": 0}]), "KeyError: 'bit_generator'"),
    (lambda extra: extra.update(samplers=["rank 0"]), "TypeError"),
    (lambda extra: extra["samplers"][0]["bit_generator"].update(state=5),
     "TypeError: 'int' object is not subscriptable"),
    (lambda extra: extra.update(tokens_seen=math.inf), "OverflowError"),
    (lambda extra: extra.update(elapsed_s="ten"), "could not convert string to float: 'ten'"),
    (lambda extra: extra.update(train_config=[4]), "AttributeError"),
    (lambda extra: extra.update(val_windows={"streams": None, "batch_size": 4}), "TypeError"),
    (lambda extra: extra.update(history={"train_loss": 3}), "history must map"),
    (lambda extra: extra.update(run_id=7), "run_id must be a string, got 7"),
    (lambda extra: extra.update(model_config=[1]), None),  # the mismatch check reads it first
], ids=["sampler-key", "sampler-type", "sampler-rng", "tokens-seen", "elapsed", "train-config",
        "val-windows", "history", "run-id", "model-config"])
def test_a_damaged_trainer_record_in_a_checkpoint_is_a_checkpoint_error_naming_the_file(
    dataset: TokenDataset, tmp_path: Path, damage: Callable[[dict[str, Any]], Any],
    named: str | None,
) -> None:
    """Each once escaped as the bare KeyError, TypeError or ValueError of the value's first use
    (or, for a history, of the next step), naming neither the file nor what to do."""
    Trainer(tiny(dataset), config(tmp_path, max_steps=2), dataset).fit()
    state_file = latest_training_state(tmp_path / "ckpt") / "state.json"
    state = json.loads(state_file.read_text())
    damage(state["extra"])
    state_file.write_text(json.dumps(state))
    expected = ConfigError if named is None else CheckpointError
    with pytest.raises(expected) as caught:
        Trainer(tiny(dataset), config(tmp_path, max_steps=4), dataset).fit()
    message = str(caught.value)
    if named is None:
        assert "model " in message and "train.resume=false" in message
    else:
        assert f"checkpoint {state_file.parent}: the trainer's record" in message
        assert named in message
        assert "train.resume=false" in message


def test_a_damaged_rng_state_in_a_checkpoint_is_a_checkpoint_error_naming_the_file(
    dataset: TokenDataset, tmp_path: Path
) -> None:
    Trainer(tiny(dataset), config(tmp_path, max_steps=2), dataset).fit()
    latest = latest_training_state(tmp_path / "ckpt")
    save_file({"rng.cpu.0": torch.zeros(3, dtype=torch.float32)},
              latest / "extra_tensors.safetensors")
    with pytest.raises(CheckpointError, match=f"checkpoint {latest}: the trainer's record"):
        Trainer(tiny(dataset), config(tmp_path, max_steps=4), dataset).fit()


def test_resume_false_moves_an_old_runs_checkpoints_aside(
    dataset: TokenDataset, other_corpus: TokenDataset, tmp_path: Path
) -> None:
    """They used to stay: the old run's higher steps stayed "latest" and pruning removed the
    new run's checkpoints first."""
    old = config(tmp_path, max_steps=6, checkpoint_interval=2)
    Trainer(tiny(dataset), old, dataset, ListTracker("run-old")).fit()
    new = config(tmp_path, max_steps=4, checkpoint_interval=2, resume=False)
    result = Trainer(tiny(other_corpus), new, other_corpus, ListTracker("run-new")).fit()
    assert result.resumed_from is None and result.steps == 4
    ckpt = tmp_path / "ckpt"
    latest = latest_training_state(ckpt)
    assert latest.name == "step-00000004"
    assert json.loads((latest / "state.json").read_text())["extra"]["run_id"] == "run-new"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000002", "step-00000004"]
    (aside,) = ckpt.glob("replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == [
        "step-00000002", "step-00000004", "step-00000006"]
    moved = json.loads((aside / "step-00000006" / "state.json").read_text())
    assert moved["extra"]["run_id"] == "run-old"


def test_resume_false_ignores_existing_checkpoints(dataset: TokenDataset, tmp_path: Path) -> None:
    Trainer(tiny(dataset), config(tmp_path, max_steps=2), dataset).fit()
    result = Trainer(tiny(dataset), config(tmp_path, max_steps=2, resume=False), dataset).fit()
    assert result.resumed_from is None and result.steps == 2


# -- launcher environment (lmcore.distributed) ---------------------------------------------------


def test_pytorchjob_pod_without_torchrun_reads_rank_and_world_size() -> None:
    env = DistEnv.from_env({"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456",
                            "WORLD_SIZE": "2", "RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank) == (1, 2, 0)
    assert (env.master_addr, env.master_port) == ("job-master-0", 23456)
    assert env.is_distributed and not env.is_main


def test_torchrun_child_environment_wins() -> None:
    env = DistEnv.from_env({"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "WORLD_SIZE": "4",
                            "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                            "TORCHELASTIC_RUN_ID": "x", "PET_NPROC_PER_NODE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)


@pytest.mark.parametrize("nproc", ["auto", "gpu", "cpu"])
@pytest.mark.parametrize("torchrun", [True, False], ids=["under-torchrun", "one-process-pod"])
def test_a_named_process_count_per_pod_is_left_to_torchrun(nproc: str, torchrun: bool) -> None:
    # The operator and torchrun take nprocPerNode as auto, gpu or cpu too: torchrun has read it,
    # and a pod without torchrun runs one process whatever it says.
    environ = {"MASTER_ADDR": "m", "MASTER_PORT": "1", "WORLD_SIZE": "2", "RANK": "1",
               "PET_NPROC_PER_NODE": nproc}  # fmt: skip
    if torchrun:
        environ |= {"TORCHELASTIC_RUN_ID": "x", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    assert DistEnv.from_env(environ).rank == 1


def test_several_processes_per_pod_need_torchrun() -> None:
    with pytest.raises(DistributedEnvError, match="PET_NPROC_PER_NODE"):
        DistEnv.from_env({"MASTER_ADDR": "m", "MASTER_PORT": "1", "WORLD_SIZE": "2",
                          "RANK": "0", "PET_NPROC_PER_NODE": "4"})


@pytest.mark.parametrize(
    ("environ", "name"),
    [({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "m"}, "RANK"),
     ({"WORLD_SIZE": "two"}, "WORLD_SIZE"),
     ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR")],
)
def test_bad_launcher_environment_names_the_variable(environ: dict[str, str], name: str) -> None:
    with pytest.raises(DistributedEnvError, match=name):
        DistEnv.from_env(environ)


def test_no_launcher_means_one_process() -> None:
    env = DistEnv.from_env({})
    assert (env.rank, env.world_size, env.is_distributed) == (0, 1, False)


def test_recording_tracker_writes_the_callers_rank(tmp_path: Path) -> None:
    # The helper the distributed tests rely on must record what it is told.
    rec = RecordingTracker(tmp_path / "calls.jsonl")
    rec.start_run("e", None, {})
    rec.log_metrics({"a": 1.0}, 3)
    lines = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [x["method"] for x in lines] == ["start_run", "log_metrics"]
    assert all(x["rank"] == 0 for x in lines)


def test_window_sampler_union_is_the_ranks_batches_in_order(dataset: TokenDataset) -> None:
    union = UnionSampler(dataset.train, BLOCK, 3, seed=0, world=2)
    x, _ = union.next_batch()
    r0 = WindowSampler(dataset.train, BLOCK, 3, seed=0, rank=0, world_size=2).next_batch()[0]
    r1 = WindowSampler(dataset.train, BLOCK, 3, seed=0, rank=1, world_size=2).next_batch()[0]
    assert torch.equal(x, torch.cat([r0, r1]))
