"""One training job from a composed config: corpus -> lmcore Trainer -> MLflow, on every rank.

Wiring only (process group, data prep order, tracker, artifacts); the training itself is lmcore's.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmcore import distributed as D
from lmcore.config import ConfigError
from lmcore.data import CorpusError, TokenDataset, prepare_corpus
from lmcore.train import Trainer, TrainResult, Tracker, check_model_dir_place
from services.trainer import schema

log = logging.getLogger("services.trainer")


def run(cfg: Any, *, tracker: Tracker | None = None) -> TrainResult:
    """Train as configured. Under torchrun or in a PyTorchJob every process calls this.

    `tracker` replaces the one built from cfg.tracking (tests pass a recording tracker); it is
    only ever called on rank 0. The trainer's SIGTERM flag is the built tracker's cancel too, so
    a SIGTERM ends the final registration's retries.
    """
    cfg = schema.as_dictconfig(cfg)
    schema.validate(cfg)
    train_cfg = schema.train_config(cfg)
    try:  # before the data is prepared, which may take long (the Trainer checks again)
        check_model_dir_place(train_cfg, cfg.data.cache_dir, "data.cache_dir")
    except ConfigError as exc:
        raise ConfigError(f"train.{exc}") from None
    with D.distributed(train_cfg.device, train_cfg.dist_timeout_s) as (env, _device):
        _configure_logging(env)
        dataset = prepare_data(cfg, env, progress=train_cfg.progress)
        model_cfg = schema.model_config(cfg, vocab_size=dataset.tokenizer.vocab_size)
        stop = threading.Event()
        if env.is_main and tracker is None:
            tracker = make_tracker(cfg, stop)
        resolved = shareable_config(cfg)
        trainer = Trainer(
            model_cfg,
            train_cfg,
            dataset,
            tracker if env.is_main else None,
            experiment=cfg.tracking.experiment,
            register_name=cfg.tracking.register_name,
            run_params=resolved,
            env=env,
            before_end_run=lambda result: log_artifacts(tracker, cfg, result),
            stop=stop,
        )
        return trainer.fit()


def shareable_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as logged and stored (run params, config.yaml, the model dir's
    metadata, which every registry reader can download): tracking.uri without credentials."""
    from lmcore.mlflow_client import redact_uri  # mlflow stays unimported

    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    tracking = resolved.get("tracking")
    if isinstance(tracking, dict) and isinstance(tracking.get("uri"), str):
        tracking["uri"] = redact_uri(tracking["uri"])
    return resolved


def prepare_data(cfg: DictConfig, env: D.DistEnv, *, progress: bool) -> TokenDataset:
    """Local rank 0 tokenizes first; the others then open its cache (no duplicate work).

    The others wait for it on a group of their own, for up to data.prep_timeout_s: a big
    corpus's first tokenization may take far longer than train.dist_timeout_s. An error on the
    first rank reaches every rank, so none waits at a barrier forever.
    """
    kwargs = dict(
        vocab_size=cfg.model.vocab_size,
        train_ratio=cfg.data.train_ratio,
        val_ratio=cfg.data.val_ratio,
    )
    source = cfg.data.source
    first = env.local_rank == 0
    waiting = D.patient_group(cfg.data.prep_timeout_s)  # before the wait it bounds begins
    dataset, error = None, None
    if first:
        try:
            dataset = prepare_corpus(source, cfg.data.cache_dir, progress=progress and env.is_main,
                                     **kwargs)
        except (CorpusError, OSError, ValueError) as exc:
            error = exc
    errors = [e for e in D.gather_objects(None if error is None else str(error), waiting) if e]
    if error is not None:
        raise _data_error(error) from error
    if errors:
        raise CorpusError(errors[0])
    if dataset is None:
        dataset = prepare_corpus(source, cfg.data.cache_dir, progress=False, **kwargs)
    _check_fits(dataset, source, cfg.model.block_size)
    return dataset


def _check_fits(dataset: TokenDataset, source: str, block_size: int) -> None:
    """A training window takes block_size + 1 tokens and validation at least 2: a smaller
    corpus is a corpus error (exit 2) before training, every rank alike (same counts)."""
    train, val = len(dataset.train), len(dataset.val)
    short = []
    if train < block_size + 1:
        short.append(f"{train} training token(s), need model.block_size + 1 = {block_size + 1}")
    if val < 2:
        short.append(f"{val} validation token(s), need 2 (raise data.val_ratio)")
    if short:
        raise CorpusError(f"data.source: {source}: corpus too small: {'; '.join(short)}")


def _data_error(exc: Exception) -> Exception:
    return CorpusError(f"data.source: {exc}") if isinstance(exc, CorpusError) else exc


def make_tracker(cfg: DictConfig, cancel: threading.Event | None = None) -> Tracker | None:
    """MLflow at tracking.uri (mlflow imported lazily by lmcore.tracking), or none; `cancel`
    ends its waits (MlflowTracker)."""
    if not cfg.tracking.enabled:
        return None
    from lmcore.tracking import MlflowTracker

    return MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment, cancel=cancel)


def log_artifacts(tracker: Tracker | None, cfg: DictConfig, result: TrainResult) -> None:
    """The resolved config (YAML) and a loss-curve PNG, into the run; failures only warn."""
    if tracker is None:
        return
    with tempfile.TemporaryDirectory(prefix="llm-artifacts-") as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(OmegaConf.to_yaml(shareable_config(cfg)), encoding="utf-8")
        tracker.log_artifact(config_path)
        try:
            curve = plot_loss_curve(result.history, Path(tmp) / "loss_curve.png")
        except Exception as exc:  # a missing matplotlib must not fail a finished run
            log.warning("loss curve not plotted: %s", exc)
        else:
            tracker.log_artifact(curve)


def plot_loss_curve(history: dict[str, list[list[float]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = history.get(key) or []
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=label, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _configure_logging(env: D.DistEnv) -> None:
    # Rank 0 tells the story; the others speak only of trouble.
    level = logging.INFO if env.is_main else logging.WARNING
    prefix = f"[rank {env.rank}] " if env.is_distributed else ""
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s {prefix}%(name)s: %(message)s", datefmt="%H:%M:%S")
