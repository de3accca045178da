"""Trainer: AMP, fused AdamW, warmup + cosine, clipping, accumulation, eval, DDP, resume, SIGTERM.

Takes plain dataclasses and a duck-typed tracker; it must not import Hydra or MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmcore import distributed as D
from lmcore.checkpoint import CONFIG_FILE, CheckpointError, check_replaceable, save_model_dir
from lmcore.checkpoint_lock import CheckpointDirBusy, LockWaitStopped, lock_checkpoint_dir
from lmcore.config import ConfigError, ModelConfig, dataclass_from_dict
from lmcore.data import WindowSampler
from lmcore.model import Transformer
from lmcore.precision import Precision, resolve_precision
from lmcore.quant_report import quantization_report
from lmcore.registry import ModelVersionInfo  # a dataclass; mlflow is imported only when used
from lmcore.schedule import RunSchedule, warmup_for
from lmcore.train_state import (
    STEP_DIR_PREFIX,
    TrainingState,
    latest_training_state,
    load_training_state,
    read_training_extra,
    save_training_state,
    set_aside_training_states,
    step_dir,
)

log = logging.getLogger(__name__)

H100_BF16_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of one H100 SXM
TRAIN_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # what the trainer runs on
# 128 + SIGTERM: what a SIGTERM-killed process reports; torchrun reports it as 1 (see
# docs/architecture.md, Training)
INTERRUPTED_EXIT_CODE = 143
# Beside a checkpoint, written once its model is registered: a rerun that trains no step does
# not register it again.
PUBLISHED_FILE = "published.json"


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Lengths: `max_steps` optimizer steps, or `epochs` passes over train tokens.

    `max_time_s` adds a wall-clock budget: the run ends normally (final eval, checkpoint, model
    dir) after the first step past it; a resume whose budget is spent already trains no step.
    A run on course to finish its steps in time keeps the step schedule exactly; one that is
    not has its cosine decay fitted to the steps the budget allows at the pace so far, so the
    decay still ends on time. The budget counts the whole loop, evaluations included, summed
    over resumes.

    batch_size is windows per rank per micro-step; one optimizer step sees
    batch_size x grad_accum_steps x world_size windows of the model's block_size tokens.
    """

    batch_size: int = 16
    grad_accum_steps: int = 1
    max_steps: int | None = 600
    epochs: float | None = None
    max_time_s: float | None = None  # wall-clock budget in seconds; None = no limit
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50  # at most half the run's steps are warmup (schedule.warmup_for)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 turns clipping off (the norm is still measured)
    mixed_precision: str | bool = "auto"  # auto | bf16 | fp16 | fp32 | true | false
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    eval_interval: int = 100  # steps; 0 = only at the end
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 200  # steps; 0 = only at the end (and on SIGTERM)
    checkpoint_dir: str | None = "checkpoints"
    keep_checkpoints: int = 3
    # Carry on from the newest checkpoint in checkpoint_dir, which must have been trained on the
    # same data and model config (else CheckpointMismatchError). False: start over, moving the
    # checkpoints already there into checkpoint_dir/replaced-<time>/.
    resume: bool = True
    # One run per checkpoint_dir (lmcore.checkpoint_lock): how long a run waits for another to
    # let go of it, e.g. a dead node's NFS lock until its lease runs out (about 90 s).
    checkpoint_lock_wait_s: float = 120.0
    model_dir: str | None = None  # final model dir; default <checkpoint_dir>/model
    peak_flops: float = H100_BF16_PEAK_FLOPS  # per device, for MFU (reported on CUDA only)
    progress: bool = True
    dist_timeout_s: float = D.DEFAULT_TIMEOUT_S
    # At the end, rank 0 measures the final model in int8 (size, val-loss change): metrics and
    # the model dir's metadata carry it. Dynamic int8 is measured too when training on CPU.
    quantization_report: bool = True

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum_steps", "eval_batches", "log_interval",
                    "keep_checkpoints")
        for name in positive:
            _check(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 1, ">= 1")
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval", "seed"):
            _check(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 0, ">= 0")
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError(
                "epochs: set exactly one of max_steps and epochs (the other to null), got "
                f"max_steps={self.max_steps!r}, epochs={self.epochs!r}"
            )
        if self.max_steps is not None:
            _check("max_steps", self.max_steps, lambda v: isinstance(v, int) and v >= 0, ">= 0")
        if self.epochs is not None:
            _check("epochs", self.epochs, lambda v: 0 < v < math.inf, "> 0 and finite")
        if self.max_time_s is not None:
            _check("max_time_s", self.max_time_s, lambda v: 0 < v < math.inf,
                   "> 0 seconds and finite (or null)")
        _check("lr", self.lr, lambda v: 0 < v < math.inf, "> 0 and finite")
        _check("min_lr_ratio", self.min_lr_ratio, lambda v: 0 <= v <= 1, "in [0, 1]")
        _check("weight_decay", self.weight_decay, lambda v: 0 <= v < math.inf, ">= 0 and finite")
        _check("beta1", self.beta1, lambda v: 0 <= v < 1, "in [0, 1)")
        _check("beta2", self.beta2, lambda v: 0 <= v < 1, "in [0, 1)")
        _check("grad_clip", self.grad_clip, lambda v: 0 <= v < math.inf, ">= 0 and finite")
        _check("peak_flops", self.peak_flops, lambda v: 0 < v < math.inf, "> 0 and finite")
        # Every collective waits this long; 0 or less fails each one at once, deep in C++.
        _check("dist_timeout_s", self.dist_timeout_s, lambda v: 0 < v <= D.MAX_TIMEOUT_S,
               f"> 0 and at most {D.MAX_TIMEOUT_S:.0f} seconds (a year)")
        # The wait bounds a gloo group's timeout (plus 60 s), which overflows past about a year.
        _check("checkpoint_lock_wait_s", self.checkpoint_lock_wait_s,
               lambda v: 0 <= v <= D.MAX_TIMEOUT_S - 60,
               f">= 0 and at most {D.MAX_TIMEOUT_S - 60:.0f} seconds (a year)")
        _check("device", self.device, lambda v: TRAIN_DEVICE.fullmatch(v) is not None,
               "auto, cpu, cuda or cuda:N")
        normalize_precision(self.mixed_precision)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, data, "train")


def _check(name: str, value: Any, ok: Callable[[Any], bool], what: str) -> None:
    try:
        good = not isinstance(value, bool) and ok(value)
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{name} must be {what}, got {value!r}")


def final_model_dir(cfg: TrainConfig) -> Path | None:
    """Where a run publishes its model: model_dir, else <checkpoint_dir>/model, else nowhere."""
    if cfg.model_dir:
        return Path(cfg.model_dir)
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir) / "model"
    return None


def check_model_dir_place(
    cfg: TrainConfig, data_dir: str | os.PathLike[str] | None = None,
    data_name: str = "the token data",
) -> None:
    """ConfigError when the final model dir overlaps checkpoint_dir or `data_dir`: a publish
    replaces the whole model dir, and checkpoint pruning, resume=false and data prep move and
    delete dirs in theirs. Inside checkpoint_dir is where it goes by default, which is safe
    outside its step-* dirs (the only ones those touch). Paths are resolved, so no link or `..`
    hides an overlap."""
    target = final_model_dir(cfg)
    if target is None:
        return
    model = target.expanduser().resolve()
    clash = None
    if cfg.checkpoint_dir:
        ckpt = Path(cfg.checkpoint_dir).expanduser().resolve()
        if ckpt.is_relative_to(model):
            clash = f"{'is' if ckpt == model else 'contains'} checkpoint_dir {cfg.checkpoint_dir}"
        elif model.is_relative_to(ckpt):
            inside = model.relative_to(ckpt).parts[0]
            if inside.startswith(STEP_DIR_PREFIX):
                clash = f"is inside {inside} of checkpoint_dir {cfg.checkpoint_dir}"
    if clash is None and data_dir is not None:
        data = Path(data_dir).expanduser().resolve()
        if data.is_relative_to(model):
            clash = f"{'is' if data == model else 'contains'} {data_name} {data_dir}"
        elif model.is_relative_to(data):
            clash = f"is inside {data_name} {data_dir}"
    if clash:
        raise ConfigError(f"model_dir {target} {clash}; they must not overlap (publishing "
                          "replaces the whole model dir, and checkpoints and token data are "
                          "deleted and rebuilt in theirs): give the model a dir of its own, "
                          "e.g. the default <checkpoint_dir>/model")  # fmt: skip


def normalize_precision(value: str | bool | None) -> str:
    """The seed's boolean `mixed_precision` and its spellings -> auto | bf16 | fp16 | fp32."""
    if value is True or str(value).lower() in ("true", "yes", "on"):
        return "auto"
    if value is False or value is None or str(value).lower() in ("false", "no", "off"):
        return "fp32"
    if value not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(
            f"mixed_precision must be auto, bf16, fp16, fp32 or a bool, got {value!r}"
        )
    return str(value)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on >= 2-D weights only (not norms or biases), fused.

    The fused kernel exists for CUDA and CPU; on one CPU core it takes 18 ms where the default
    foreach path takes 68 ms for the 14M-parameter benchmark model.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=device.type in ("cuda", "cpu"),
    )


# -- results, tracker, samplers -----------------------------------------------------------------


class Tracker(Protocol):
    """What the trainer calls on rank 0 (lmcore.tracking.MlflowTracker / NullTracker fit)."""

    def start_run(self, experiment: str, run_id: str | None, params: dict[str, Any]) -> str | None:
        ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None: ...

    def log_model_dir(
        self, model_dir: Any, register_name: str | None, alias: str = "candidate"
    ) -> Any: ...

    def end_run(self, status: str) -> None: ...


class _NoTracker:
    """Used when no tracker is given, so lmcore.train does not depend on lmcore.tracking."""

    def start_run(self, experiment: str, run_id: str | None, params: dict[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
        pass

    def log_model_dir(self, model_dir: Any, register_name: str | None, alias: str = "candidate"):
        return None

    def end_run(self, status: str) -> None:
        pass


class Sampler(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# (tokens, block_size, batch_size, seed, rank, world_size) -> sampler. A test hook: the default
# gives each rank its own window stream.
SamplerFactory = Callable[[np.ndarray, int, int, int, int, int], Sampler]


def window_sampler(
    tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int, world_size: int
) -> WindowSampler:
    return WindowSampler(tokens, block_size, batch_size, seed=seed, rank=rank,
                         world_size=world_size)


@dataclass
class TrainResult:
    model_dir: Path | None  # None on ranks other than 0, or without a checkpoint/model dir
    final_val_loss: float
    steps: int
    tokens_per_s: float
    run_id: str | None
    data_time_share: float = 0.0
    resumed_from: int | None = None
    model_version: Any = None
    history: dict[str, list[list[float]]] = field(default_factory=dict)
    elapsed_s: float = 0.0  # the training loop's wall time, summed over resumes
    stopped_by_time: bool = False  # max_time_s ended the run before its steps did


class CheckpointMismatchError(ConfigError):
    """The newest checkpoint in checkpoint_dir was trained on other data or another model."""


def data_identity(dataset: Any) -> dict[str, str | None]:
    """What a run trains on: the token cache's key and text hash, the tokenizer's digest."""
    meta = getattr(dataset, "meta", None)
    meta = meta if isinstance(meta, dict) else {}
    tok = getattr(dataset, "tokenizer", None)
    return {
        "cache_key": meta.get("cache_key"),
        "content_hash": meta.get("content_hash"),
        "tokenizer_sha256": (hashlib.sha256(tok.to_str().encode()).hexdigest()
                             if tok is not None else None),
    }


class TrainingInterrupted(RuntimeError):
    """SIGTERM: a checkpoint was saved at `step`; exit non-zero so the job is restarted."""

    exit_code = INTERRUPTED_EXIT_CODE

    def __init__(self, step: int, checkpoint: Path | None, when: str | None = None) -> None:
        where = f", checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted by SIGTERM {when or f'at step {step}'}{where}")
        self.step = step
        self.checkpoint = checkpoint


class TrainingDiverged(RuntimeError):
    """The validation loss or the weights turned NaN or infinite: the run fails unpublished (a
    registered model would be promoted like any other), and no checkpoint of those weights is
    written (a resume would carry on from them)."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(
            f"training diverged: {what} at step {step}; the model is not published and these "
            "weights are not checkpointed (lower train.lr or train.grad_clip, then resume from "
            "the last checkpoint or start over)"
        )
        self.step = step


@contextlib.contextmanager
def _sigterm_flag(event: threading.Event | None = None) -> Iterator[threading.Event]:
    """`event` (default: a new one), set by SIGTERM while the body runs (the old handler is
    restored after)."""
    event = event if event is not None else threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event  # signals only reach the main thread
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- the trainer --------------------------------------------------------------------------------


class _Meter:
    """Tokens and data-loading time over a stretch of steps (a log interval, or the run)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.end = time.perf_counter(), None
        self.tokens, self.data_s, self.steps = 0, 0.0, 0

    def add(self, tokens: int, data_s: float) -> None:
        self.tokens += tokens
        self.data_s += data_s
        self.steps += 1

    def stop(self) -> None:
        self.end = time.perf_counter()

    @contextlib.contextmanager
    def paused(self, *others: _Meter) -> Iterator[None]:
        """Leave the body's time (an evaluation, a checkpoint) out of this and `others`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            for meter in (self, *others):
                meter.start += time.perf_counter() - t0

    def elapsed(self) -> float:
        return (self.end or time.perf_counter()) - self.start

    def rate(self) -> float:
        return self.tokens / self.elapsed() if self.steps else 0.0

    def data_share(self) -> float:
        return self.data_s / self.elapsed() if self.steps else 0.0


class Trainer:
    """Trains a Transformer on a TokenDataset; `fit()` runs the whole job on this rank.

    Works alone, under torchrun and in PyTorchJob pods: the process group is created from the
    environment unless one already exists (then the caller owns it). Rank 0 alone talks to the
    tracker and writes checkpoints and the model dir; other ranks wait at barriers for each
    checkpoint, but not for the final model dir and its registration: they return first.

    `stop` is the event SIGTERM sets during fit() (default: a new one per fit); setting it
    stops the run too. Give the same event to a tracker that waits on a server
    (MlflowTracker's `cancel`), so that a SIGTERM during the final registration ends its
    retries: the run then stops as on any SIGTERM, with the model saved but not registered.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        dataset: Any,
        tracker: Tracker | None = None,
        *,
        experiment: str = "llm-pipeline",
        register_name: str | None = "llm",
        run_params: dict[str, Any] | None = None,
        sampler_factory: SamplerFactory = window_sampler,
        env: D.DistEnv | None = None,
        before_end_run: Callable[[TrainResult], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        tok = getattr(dataset, "tokenizer", None)
        if tok is not None and tok.vocab_size > model_config.vocab_size:
            raise ConfigError(
                f"vocab_size {model_config.vocab_size} is smaller than the tokenizer's "
                f"{tok.vocab_size}"
            )
        self.model_config = model_config
        self.cfg = train_config
        self.dataset = dataset
        self.tracker: Tracker = tracker if tracker is not None else _NoTracker()
        self.experiment = experiment
        self.register_name = register_name
        self.run_params = run_params
        self.sampler_factory = sampler_factory
        self.env = env
        # Rank 0, after a successful run and before the tracker's run ends (e.g. more artifacts).
        self.before_end_run = before_end_run
        self.stop = stop

    # The fit() pieces below share state through attributes set in _setup().
    model: Transformer
    train_model: nn.Module
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler
    precision: Precision
    sampler: Sampler
    device: torch.device
    dist_env: D.DistEnv
    schedule: RunSchedule  # the LR schedule and the time budget's pace (lmcore.schedule)
    run_id: str | None
    history: dict[str, list[list[float]]]
    data: dict[str, str | None]  # data_identity(dataset), recorded in every checkpoint
    _clock: float  # perf_counter() at which the loop would have started without interruptions

    def fit(self) -> TrainResult:
        D.stop_with_launcher()
        env = self.env or D.DistEnv.from_env()
        device = D.resolve_device(self.cfg.device, env)
        owns_group = env.is_distributed and not D.active()
        D.init_process_group(env, device, self.cfg.dist_timeout_s)
        try:
            with _sigterm_flag(self.stop) as stop, self._places_claimed(env, stop):
                return self._fit(env, device, stop)
        finally:
            if owns_group:
                D.destroy_process_group()

    @contextlib.contextmanager
    def _places_claimed(self, env: D.DistEnv, stop: threading.Event) -> Iterator[None]:
        """Before anything is written: the model dir must be one the run can publish to (else
        the run would fail at its end, not now), and rank 0 holds checkpoint_dir's lock for the
        run. Every rank hears a refusal."""
        refusal = D.broadcast_object(self._model_dir_refusal() if env.is_main else None)
        if refusal:
            raise ConfigError(refusal)
        lock, busy, failure = None, None, None
        wait_s = self.cfg.checkpoint_lock_wait_s
        # The other ranks wait for rank 0's lock in a group of their own: the default group's
        # timeout (dist_timeout_s) is sized for training steps, not for this wait.
        waiting = D.patient_group(wait_s + 60) if self.cfg.checkpoint_dir else None
        if env.is_main and self.cfg.checkpoint_dir:
            try:
                lock = lock_checkpoint_dir(self.cfg.checkpoint_dir, wait_s, stop=stop)
            except LockWaitStopped:
                busy = "SIGTERM"
            except CheckpointDirBusy as exc:
                busy = str(exc)
            except OSError as exc:  # e.g. a checkpoint_dir this user may not create
                failure = f"checkpoint_dir {self.cfg.checkpoint_dir}: {exc}"
        busy, failure = D.broadcast_object((busy, failure), group=waiting)
        if busy == "SIGTERM":  # as any SIGTERM: exit 143 so the job restarts (nothing trained)
            raise TrainingInterrupted(0, None, f"while waiting for checkpoint_dir "
                                               f"{self.cfg.checkpoint_dir}'s lock, before training")
        if busy:
            raise CheckpointDirBusy(busy)
        if failure:
            raise RuntimeError(failure)
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    # -- setup ----------------------------------------------------------------------------------

    def _setup(self, env: D.DistEnv, device: torch.device) -> int:
        cfg = self.cfg
        self.dist_env, self.device = env, device
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls AMP leaves
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = Transformer(self.model_config).to(device)
        self.precision = resolve_precision(normalize_precision(cfg.mixed_precision), device)
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.scaler = self.precision.grad_scaler()
        block = self.model_config.block_size
        self.schedule = RunSchedule.start(cfg, len(self.dataset.train), block, env.world_size,
                                          self._step_setup())
        self.sampler = self.sampler_factory(
            self.dataset.train, block, cfg.batch_size, cfg.seed, env.rank, env.world_size
        )
        torch.manual_seed(cfg.seed + 1 + env.rank)  # dropout differs per rank
        self.history = {"train_loss": [], "val_loss": []}
        self.run_id = None
        self.data = data_identity(self.dataset)
        # The run's validation windows: eval_batches batches of `batch_size` windows from each
        # of `streams` streams, the windows its first session's ranks drew (_val_share).
        self.val_windows = {"streams": env.world_size, "batch_size": cfg.batch_size}
        start = self._resume()
        model: nn.Module = self.model
        if cfg.compile:
            model = torch.compile(model)  # type: ignore[assignment]
        if env.is_distributed:
            ids = [device.index] if device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        self.train_model = model
        return start

    def _model_dir_refusal(self) -> str | None:
        """Rank 0 (the one that publishes): why the final model dir cannot be published where
        configured, or None."""
        target = final_model_dir(self.cfg)
        try:
            check_model_dir_place(self.cfg, getattr(self.dataset, "path", None))
            if target is not None:
                check_replaceable(target)
        except ConfigError as exc:
            return str(exc)
        except FileExistsError as exc:
            return f"model_dir {exc}"
        return None

    def _resume(self) -> int:
        """Load the newest complete checkpoint, if any; every rank loads the one rank 0 chose.

        Rank 0 refuses one trained on other data or another model config, and every rank
        raises its reason. With resume=false it moves the checkpoints already there aside, so
        they neither stay the newest nor crowd out this run's when old ones are pruned.
        """
        ckpt_dir, main = self.cfg.checkpoint_dir, self.dist_env.is_main
        found, refusal, failure = None, None, None
        try:
            if ckpt_dir and main and self.cfg.resume:
                found = latest_training_state(ckpt_dir)
                refusal = self._mismatch(found) if found else None
            elif ckpt_dir and main:
                aside = set_aside_training_states(ckpt_dir, time.strftime("%Y%m%d-%H%M%S"))
                if aside:
                    log.warning("resume=false: moved the checkpoints in %s into %s",
                                ckpt_dir, aside)
        except (OSError, CheckpointError) as exc:  # every rank must hear it, not wait for rank 0
            failure = f"checkpoint_dir {ckpt_dir}: {exc}"
        chosen, refusal, failure = D.broadcast_object(
            (str(found) if found else None, refusal, failure))
        if failure:
            raise RuntimeError(failure)
        if refusal:
            raise CheckpointMismatchError(refusal)
        if chosen is None:
            return 0
        if not Path(chosen).is_dir():
            raise RuntimeError(
                f"rank {self.dist_env.rank} cannot see checkpoint {chosen}: "
                "checkpoint_dir must be storage shared by all ranks"
            )
        state = load_training_state(
            chosen, model=self.model, optimizer=self.optimizer, scaler=self.scaler
        )
        failure = None
        try:
            self._restore_record(state)
        except (ArithmeticError, AttributeError, LookupError, RuntimeError, TypeError,
                ValueError) as exc:
            failure = (f"checkpoint {chosen}: the trainer's record in it (state.json's extra, "
                       f"the RNG states) does not load: {type(exc).__name__}: {exc}. Move the "
                       "dir aside to resume from the checkpoint before it, or set "
                       "train.resume=false")
        # A rank's own part (its sampler, its RNG) may be the damaged one: every rank must hear
        # of it, or the others would wait at the first step's all-reduce until the timeout.
        failures = [f for f in D.gather_objects(failure) if f]
        if failures:
            raise CheckpointError(failures[0])
        if self.dist_env.is_main:
            log.info("resumed from %s (step %d)", chosen, state.step)
        return state.step

    def _restore_record(self, state: TrainingState) -> None:
        """Carry on where the checkpoint's `extra` (_save_checkpoint's record) left off: the run,
        its history, its schedule, and this rank's data stream and RNG. A damaged record raises
        whatever its values make Python raise (_resume turns that into a CheckpointError)."""
        extra = state.extra
        run_id, history = extra.get("run_id"), extra.get("history")
        if not isinstance(run_id, (str, type(None))):
            raise TypeError(f"run_id must be a string, got {run_id!r}")
        if history is not None and not (
            isinstance(history, dict)
            and all(isinstance(history.get(k, []), list) for k in self.history)
        ):
            raise TypeError("history must map train_loss and val_loss to lists")
        self.run_id = run_id
        self.history = {**self.history, **history} if history else self.history
        schedule = self.schedule
        schedule.resume(state.step, extra)
        if schedule.by_tokens and self.dist_env.is_main:
            log.warning("resuming with %d tokens per step (schedule: %d): %d steps left for "
                        "the run's %d tokens", schedule.tokens_per_step,
                        schedule.schedule_tokens_per_step, schedule.steps - state.step,
                        schedule.schedule_steps * schedule.schedule_tokens_per_step)
        recorded = extra.get("val_windows")  # not recorded before: this session's, as then
        if isinstance(recorded, dict):
            self.val_windows = {k: int(recorded[k]) for k in ("streams", "batch_size")}
        rank, world = self.dist_env.rank, self.dist_env.world_size
        if extra.get("world_size") == world and len(extra.get("samplers", [])) == world:
            self.sampler.load_state_dict(extra["samplers"][rank])
            if f"rng.cpu.{rank}" in state.extra_tensors:
                torch.set_rng_state(state.extra_tensors[f"rng.cpu.{rank}"])
            cuda_rng = state.extra_tensors.get(f"rng.cuda.{rank}")
            if cuda_rng is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda_rng, self.device)
        else:
            # A different world size cannot replay the old streams; fresh ones per (step, rank).
            log.warning("resuming with world size %d (checkpoint: %s): new data streams",
                        world, extra.get("world_size"))
            self.sampler = self.sampler_factory(
                self.dataset.train, self.model_config.block_size, self.cfg.batch_size,
                self.cfg.seed + state.step, rank, world,
            )

    def _mismatch(self, path: Path) -> str | None:
        """Why the checkpoint at `path` is not this run's to carry on, or None when it is."""
        extra = read_training_extra(path)
        recorded = extra.get("data")
        if isinstance(recorded, dict):
            differs = [f"data {key} {_short(recorded.get(key))} (this run: {_short(value)})"
                       for key, value in self.data.items() if recorded.get(key) != value]
        else:
            differs = ["it does not record the data it was trained on (an older checkpoint)"]
        model = extra.get("model_config")
        if not isinstance(model, dict):
            model = {}
        differs += [f"model {key} {model.get(key)!r} (this run: {value!r})"
                    for key, value in self.model_config.to_dict().items()
                    if model.get(key) != value]
        if not differs:
            return None
        return (f"will not resume {path}: {'; '.join(differs)}. Resuming would carry on another "
                "run's weights and publish them as this run's model. To keep that run, give "
                "this one a fresh train.checkpoint_dir; to start over in "
                f"{self.cfg.checkpoint_dir}, set train.resume=false (its checkpoints are then "
                "moved into a replaced-<time>/ dir there)")

    # -- the loop -------------------------------------------------------------------------------

    def _fit(self, env: D.DistEnv, device: torch.device, stop: threading.Event) -> TrainResult:
        start = self._setup(env, device)
        main = env.is_main
        if main:
            self.run_id = self._start_run()
        self.run_id = D.broadcast_object(self.run_id)
        try:
            result = self._loop(start, stop)
        except TrainingInterrupted:
            if main:
                self.tracker.end_run("KILLED")
            raise
        except BaseException:
            if main:
                self.tracker.end_run("FAILED")
            raise
        if main:
            try:
                if self.before_end_run is not None:
                    self.before_end_run(result)
            finally:
                self.tracker.end_run("FINISHED")
        return result

    def _loop(self, start: int, stop: threading.Event) -> TrainResult:
        cfg, main = self.cfg, self.dist_env.is_main
        bar = self._progress_bar(start)
        meter, run_meter = _Meter(), _Meter()  # per log interval; whole run
        val_loss, evaluated_at = math.nan, -1
        saved_at, last_path = -1, None
        step = start
        budget = cfg.max_time_s
        schedule = self.schedule
        self._clock = time.perf_counter() - schedule.elapsed_before  # a resumed run's time counts
        # Until the first vote comes back, the checkpoint's time (the same on every rank).
        agreed = D.Agreed(False, schedule.elapsed_before)
        stop_vote = D.StopVote(start=agreed)
        warned_warmup = False
        # A budget the checkpoint has spent already (the same command run again after a time
        # stop) trains no step; every rank loaded the same elapsed time, so all of them agree.
        # Checked after each step below, it used to let such a run train one step more, which
        # then published as a new model version at every rerun.
        last = start if budget and agreed.elapsed_s >= budget else schedule.steps
        if last == start < schedule.steps:
            bar.total = start
        try:
            for step in range(start + 1, last + 1):
                if step == start + 2:
                    run_meter.reset()  # the first step pays for compilation and warm-up
                # From the agreed time (the same on every rank), so every rank takes the same lr.
                # It is the time at the end of step `done` (between ranks the vote lags a step).
                done = max(start, step - 1 - stop_vote.lag)
                on_course = schedule.on_course(done, agreed.elapsed_s)
                lr = schedule.lr(step - 1, on_course)
                if main and not warned_warmup and warmup_for(cfg, on_course) < cfg.warmup_steps:
                    warned_warmup = True
                    log.warning("warmup_steps=%d is more than half of the run's %d steps: "
                                "warming up for %d steps, so the LR can decay",
                                cfg.warmup_steps, math.ceil(on_course),
                                warmup_for(cfg, on_course))
                loss, grad_norm, data_s = self._optimizer_step(lr)
                for m in (meter, run_meter):
                    m.add(schedule.tokens_per_step, data_s)
                bar.update(1)
                if step % cfg.log_interval == 0 or step == schedule.steps:
                    self._log_train(step, loss, grad_norm, lr, meter, bar)
                # Not training: kept out of the next interval's tokens/s and MFU.
                if cfg.eval_interval and step % cfg.eval_interval == 0:
                    with meter.paused(run_meter):
                        val_loss, evaluated_at = self._evaluate(step), step
                if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0:
                    with meter.paused(run_meter):
                        saved_at, last_path = step, self._save_checkpoint(step)
                agreed = stop_vote(stop.is_set(), self._elapsed())
                if agreed.stop:  # every rank stops at the same step
                    stop_vote.close()
                    if saved_at != step:
                        last_path = self._save_checkpoint(step)
                    raise TrainingInterrupted(step, last_path)
                if budget and agreed.elapsed_s >= budget:
                    bar.total = step  # the bar ends full
                    break  # out of time: finish as if the steps had run out
                if budget:
                    bar.total = max(step + 1, math.ceil(on_course))  # what the budget allows
            stop_vote.close()
        finally:
            bar.close()
        run_meter.stop()
        elapsed = self._elapsed()
        stopped_by_time = step < schedule.steps
        if stopped_by_time and main:
            log.info("time budget of %.0f s reached at step %d of %d", budget, step,
                     schedule.steps)
        if evaluated_at != step:
            val_loss = self._evaluate(step)
        if saved_at != step and step > start:
            self._save_checkpoint(step)
        ended_by = "time" if stopped_by_time else "steps"
        # Rank 0 publishes alone, and nobody waits for it: registration retries for up to the
        # tracker's publish_timeout_s, which a barrier (bound by dist_timeout_s) would not
        # outlast. Every collective of the run is behind us: the final eval and checkpoint.
        model_dir, version = (self._publish(step, val_loss, ended_by, stop, trained=step > start)
                              if main else (None, None))  # fmt: skip
        return TrainResult(
            model_dir=model_dir,
            final_val_loss=val_loss,
            steps=step,
            tokens_per_s=run_meter.rate(),
            run_id=self.run_id,
            data_time_share=run_meter.data_share(),
            resumed_from=start or None,
            model_version=version,
            history=self.history,
            elapsed_s=elapsed,
            stopped_by_time=stopped_by_time,
        )

    def _elapsed(self) -> float:
        """Seconds of training loop so far, including the runs this one resumed."""
        return time.perf_counter() - self._clock

    def _optimizer_step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over grad_accum_steps micro-batches -> (mean loss, grad norm, data s).

        Loss and norm stay on the device: reading them waits for the GPU, so only logging does.
        """
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.train_model.train()
        total = torch.zeros((), device=self.device)
        data_s = 0.0
        ddp = isinstance(self.train_model, DistributedDataParallel)
        for micro in range(cfg.grad_accum_steps):
            t0 = time.perf_counter()
            x, y = self.sampler.next_batch()
            if self.device.type == "cuda":
                # Page-locked, so the copies below queue behind the GPU instead of waiting for it
                # (from pageable memory they block, and that wait would be counted as data time).
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            data_s += time.perf_counter() - t0
            last = micro == cfg.grad_accum_steps - 1
            # Gradients are all-reduced only on the last micro-step.
            sync = self.train_model.no_sync() if ddp and not last else contextlib.nullcontext()
            with sync:
                with self.precision.autocast():
                    _, loss = self.train_model(x, y)
                    loss = loss / cfg.grad_accum_steps
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm.detach(), data_s

    def _val_share(self, val: np.ndarray, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's part of the run's validation windows, and how many windows there are.

        The windows are those the run's first session evaluated: `eval_batches` batches of its
        batch_size from each of its ranks' streams (seed, rank). Every session takes the same
        ones, whatever its world size and batch size, and splits them evenly among its ranks;
        they used to be each session's own ranks' draws, so a resized run's val_loss moved by
        the change of windows alone. A session of the first one's world size and batch size
        evaluates each rank's windows on that rank, as before.
        """
        streams, batch = self.val_windows["streams"], self.val_windows["batch_size"]
        per_stream = self.cfg.eval_batches * batch
        total = streams * per_stream
        rank, world = self.dist_env.rank, self.dist_env.world_size
        lo, hi = rank * total // world, (rank + 1) * total // world
        none = torch.empty(0, block, dtype=torch.long)
        xs, ys = [none], [none]
        for stream in range(lo // per_stream, -(-hi // per_stream)):  # those holding [lo, hi)
            sampler = WindowSampler(val, block, batch, seed=self.cfg.seed, rank=stream,
                                    world_size=streams)
            batches = [sampler.next_batch() for _ in range(self.cfg.eval_batches)]
            first = stream * per_stream
            part = slice(max(lo - first, 0), hi - first)
            xs.append(torch.cat([x for x, _ in batches])[part])
            ys.append(torch.cat([y for _, y in batches])[part])
        return torch.cat(xs), torch.cat(ys), total

    @torch.no_grad()
    def _evaluate(self, step: int) -> float:
        """Mean validation loss over the run's fixed windows (_val_share), shared by the ranks."""
        val = self.dataset.val
        block = min(self.model_config.block_size, len(val) - 1)
        if block < 1:
            raise ValueError(f"validation split has {len(val)} token(s); need at least 2")
        xs, ys, windows = self._val_share(val, block)
        model = self.train_model  # the compiled module when compiling, never the DDP wrapper
        if isinstance(model, DistributedDataParallel):
            model = model.module
        model.eval()
        total = torch.zeros((), device=self.device)
        for i in range(0, len(xs), self.cfg.batch_size):  # this session's batches fit memory
            x, y = xs[i:i + self.cfg.batch_size], ys[i:i + self.cfg.batch_size]
            with self.precision.autocast():
                _, loss = model(x.to(self.device), y.to(self.device))
            total += loss.float() * len(x)  # every window has `block` tokens
        model.train()
        # Each rank's share of the mean over all windows; the shares add up to it.
        val_loss = D.mean_across_ranks(total / windows, self.device) * self.dist_env.world_size
        self.history["val_loss"].append([step, val_loss])
        if self.dist_env.is_main:
            ppl = math.exp(min(val_loss, 50.0))
            self.tracker.log_metrics({"val_loss": val_loss, "val_perplexity": ppl}, step)
            log.info("step %d: val loss %.4f, perplexity %.2f", step, val_loss, ppl)
        if not math.isfinite(val_loss):  # the same mean on every rank: all of them stop here
            raise TrainingDiverged(step, f"validation loss {val_loss}")
        return val_loss

    def _log_train(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, meter: _Meter,
        bar: Any,
    ) -> None:
        train_loss = D.mean_across_ranks(loss, self.device)  # all ranks take part
        self.history["train_loss"].append([step, train_loss])
        if not self.dist_env.is_main:
            meter.reset()
            return
        metrics = {
            "train_loss": train_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),  # the norm before clipping
            "tokens_per_s": meter.rate(),
            "data_time_share": meter.data_share(),
        }
        if self.device.type == "cuda":
            fpt = self.model.flops_per_token(self.model_config.block_size)
            peak = self.cfg.peak_flops * self.dist_env.world_size
            metrics["mfu"] = fpt * metrics["tokens_per_s"] / peak
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.tracker.log_metrics(metrics, step)
        bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
        limit = self.cfg.max_time_s
        budget = f", {self._elapsed():.0f} of {limit:.0f} s" if limit else ""
        log.info("step %d/%d: loss %.4f, lr %.2e, %.0f tok/s%s", step, self.schedule.steps,
                 train_loss, lr, metrics["tokens_per_s"], budget)
        meter.reset()

    # -- checkpoints and the final model --------------------------------------------------------

    def _step_setup(self) -> dict[str, Any]:
        """What the time of a step depends on (the model is the checkpoint's), saved with the
        pace: steps timed on another setup say nothing about this one's."""
        cfg = self.cfg
        return {"batch_size": cfg.batch_size, "grad_accum_steps": cfg.grad_accum_steps,
                "world_size": self.dist_env.world_size, "device": self.device.type,
                "precision": self.precision.name, "compile": cfg.compile}

    def _save_checkpoint(self, step: int) -> Path | None:
        """Every rank hands over its sampler and RNG state; rank 0 writes; all wait for it."""
        if not self.cfg.checkpoint_dir:
            return None
        # Every rank holds the same weights, so all of them stop here together. Checkpoints
        # come between evaluations too (or with none at all): the weights are checked themselves.
        finite = torch.stack([p.detach().isfinite().all() for p in self.model.parameters()])
        if not bool(finite.all()):
            raise TrainingDiverged(step, "non-finite weights")
        samplers = D.gather_objects(self.sampler.state_dict())
        cpu_rngs = D.gather_objects(torch.get_rng_state())
        cuda_rngs = D.gather_objects(
            torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        )
        path = None
        if self.dist_env.is_main:
            tensors = {f"rng.cpu.{r}": t for r, t in enumerate(cpu_rngs)}
            tensors.update({f"rng.cuda.{r}": t for r, t in enumerate(cuda_rngs) if t is not None})
            path = save_training_state(
                self.cfg.checkpoint_dir, step,
                model=self.model, optimizer=self.optimizer,
                scaler=self.scaler if self.scaler.is_enabled() else None,
                extra={
                    "run_id": self.run_id,
                    "world_size": self.dist_env.world_size,
                    "samplers": samplers,
                    "history": self.history,
                    # elapsed_s, pace, pace_setup, tokens_seen, schedule
                    **self.schedule.record(step, self._elapsed()),
                    "data": self.data,  # with model_config: what a resume must match
                    "val_windows": self.val_windows,
                    "train_config": self.cfg.to_dict(),
                    "model_config": self.model_config.to_dict(),
                },
                extra_tensors=tensors,
                keep=self.cfg.keep_checkpoints,
            )
        D.barrier()
        return path

    def _publish(
        self, step: int, val_loss: float, ended_by: str, stop: threading.Event, *,
        trained: bool = True,
    ) -> tuple[Path | None, Any]:
        """Rank 0: write the final model dir and hand it to the tracker (alias "candidate").

        A session that trained no step (the same command run again after it finished) does
        not register its checkpoint's model a second time: a publish of this step and run that
        succeeded is recorded beside the checkpoint (PUBLISHED_FILE) and returned instead.
        """
        target = final_model_dir(self.cfg)
        if target is None:
            return None, None
        published = None if trained else self._published_at(step)
        if published is not None and _model_dir_holds(target, step, self.run_id):
            log.info("step %d of run %s is already published (%s): nothing new to register",
                     step, self.run_id, published.uri or published.version)
            return target, published
        metadata = {
            "step": step,
            "val_loss": val_loss,
            "run_id": self.run_id,
            "tokens_seen": int(self.schedule.tokens_at(step)),
            "ended_by": ended_by,  # "steps", or "time" (max_time_s)
            "train_time_s": round(self._elapsed(), 1),
            "config": self.run_params or {"train": self.cfg.to_dict()},
            "data": {k: self.dataset.meta.get(k) for k in ("source", "content_hash", "cache_key")}
            if isinstance(getattr(self.dataset, "meta", None), dict) else {},
        }
        if self.cfg.quantization_report:
            metadata["quantization"] = self._quantization_report(step)
        path = save_model_dir(target, self.model, getattr(self.dataset, "tokenizer", None),
                              metadata)
        if published is not None:  # the model dir was missing: rewritten, not registered again
            return path, published
        version = self._register(path, step, stop)
        self._record_published(step, version)
        return path, version

    def _register(self, path: Path, step: int, stop: threading.Event) -> Any:
        """The tracker's log_model_dir, unless SIGTERM comes first or ends its retries: then
        TrainingInterrupted (exit 143 within the pod's grace period, not after the retries)."""
        if not stop.is_set():
            try:
                return self.tracker.log_model_dir(path, self.register_name, alias="candidate")
            except Exception:
                if not stop.is_set():
                    raise
        checkpoint = self._checkpoint_at(step)
        if checkpoint is None:
            later = "a rerun trains again (no checkpoint_dir)"
        else:  # no PUBLISHED_FILE: the rerun registers it
            later = (f"run the same command again to register it (it resumes {checkpoint}, "
                     "trains no step and publishes)")
        log.warning("SIGTERM: the model in %s is saved but not registered; %s", path, later)
        raise TrainingInterrupted(step, checkpoint)

    def _checkpoint_at(self, step: int) -> Path | None:
        if not self.cfg.checkpoint_dir:
            return None
        return step_dir(self.cfg.checkpoint_dir, step)

    def _published_record(self, step: int) -> Path | None:
        checkpoint = self._checkpoint_at(step)
        return checkpoint / PUBLISHED_FILE if checkpoint is not None else None

    def _published_at(self, step: int) -> ModelVersionInfo | None:
        """What a successful publish of this step's model by this run recorded, if any, as the
        tracker returned it then (the same TrainResult.model_version a first run gives)."""
        record = self._published_record(step)
        try:
            found = json.loads(record.read_text()) if record is not None else None
        except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep
            return None
        if not isinstance(found, dict) or found.get("step") != step:
            return None
        if found.get("run_id") != self.run_id or found.get("name") != self.register_name:
            return None  # another run (the old one deleted) or registered model: publish
        return ModelVersionInfo(found.get("name"), found.get("version"), self.run_id,
                                found.get("uri") or "")  # fmt: skip

    def _record_published(self, step: int, version: Any) -> None:
        record = self._published_record(step)
        if record is None or version is None or not record.parent.is_dir():
            return  # nothing registered (no tracker), or no checkpoint of this step
        info = {"step": step, "run_id": self.run_id, "name": self.register_name,
                "version": getattr(version, "version", None), "uri": getattr(version, "uri", None)}
        tmp = record.with_name(f".{record.name}.tmp")
        try:
            tmp.write_text(json.dumps(info), encoding="utf-8")
            tmp.replace(record)
        except OSError as exc:  # costs only a duplicate version if this command runs again
            log.warning("could not record the publish in %s: %s", record, exc)

    def _quantization_report(self, step: int) -> dict[str, float] | None:
        """Rank 0: the final model's size and val loss in fp32 and int8, on fixed val windows."""
        val = self.dataset.val
        try:
            report = quantization_report(
                self.model, val, min(self.model_config.block_size, len(val) - 1),
                windows=self.cfg.eval_batches, batch_size=self.cfg.batch_size,
                include_dynamic=self.device.type == "cpu",
            )  # fmt: skip
        except Exception:  # a report must never fail a finished run, nor lose its model
            log.warning("quantization report skipped", exc_info=True)
            return None
        self.tracker.log_metrics({f"quant_{k}": v for k, v in report.items()}, step)
        log.info("int8 weight-only: %.1f of %.1f MB (%.2fx), val loss %.5f -> %.5f (%+.2e)",
                 report["int8_bytes"] / 1e6, report["base_bytes"] / 1e6,
                 report["int8_size_ratio"], report["base_val_loss"], report["int8_val_loss"],
                 report["int8_val_loss_delta"])  # fmt: skip
        if "dynamic_int8_bytes" in report:
            log.info("dynamic int8 (CPU): %.1f MB (%.2fx), val loss %.5f (%+.2e)",
                     report["dynamic_int8_bytes"] / 1e6, report["dynamic_int8_size_ratio"],
                     report["dynamic_int8_val_loss"], report["dynamic_int8_val_loss_delta"])
        return report

    # -- small helpers --------------------------------------------------------------------------

    def _start_run(self) -> str | None:
        """A resumed job logs into its saved run; a run the tracker no longer has starts anew."""
        try:
            return self.tracker.start_run(self.experiment, self.run_id, self._params())
        except LookupError as exc:
            if self.run_id is None:
                raise
            log.warning("cannot resume tracker run %s (%s); starting a new run", self.run_id, exc)
            return self.tracker.start_run(self.experiment, None, self._params())

    def _params(self) -> dict[str, Any]:
        if self.run_params is not None:
            return self.run_params
        return {"model": self.model_config.to_dict(), "train": self.cfg.to_dict(),
                "world_size": self.dist_env.world_size}

    def _progress_bar(self, start: int) -> Any:
        if not (self.cfg.progress and self.dist_env.is_main):
            return _NoBar()
        from tqdm import tqdm  # lazy: lmcore's top level stays torch/numpy/tokenizers/safetensors

        return tqdm(total=self.schedule.steps, initial=start, unit="step", desc="train",
                    file=sys.stderr, dynamic_ncols=True)


def _model_dir_holds(path: Path, step: int, run_id: str | None) -> bool:
    """Whether the model dir at `path` is this step's model of this run (its metadata says)."""
    try:
        metadata = json.loads((path / CONFIG_FILE).read_text()).get("metadata") or {}
    except (OSError, ValueError, RecursionError, AttributeError):
        return False
    return metadata.get("step") == step and metadata.get("run_id") == run_id


def _short(value: Any) -> str:
    """A digest cut to 16 characters (a cache key's length) for messages."""
    text = str(value)
    return text[:16] if len(text) > 16 else text


class _NoBar:
    total = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass
