"""Structured configs (dataclasses) behind config/: an unknown key or a wrong type fails at compose.

Schema, composition and conversion to lmcore's dataclasses only; it must not start training.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf

from lmcore.config import ConfigError, ModelConfig
from lmcore.distributed import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S
from lmcore.tokenizer import MIN_VOCAB_SIZE
from lmcore.train import H100_BF16_PEAK_FLOPS, TrainConfig
from services.common.serve_values import serve_device, serve_precision

# Optional[...] rather than `X | None`: OmegaConf reads these annotations at runtime.
# Defaults mirror config/; the YAML files are what users read and override.


@dataclass
class ModelSchema:
    """A model preset's fields (lmcore.config.ModelConfig) plus the preset's name."""

    name: str = "small"
    vocab_size: int = 8192  # tokenizer size to train; the model takes the tokenizer's real size
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    dropout: float = 0.0
    mlp: str = "swiglu"
    bias: bool = False
    tie_embeddings: bool = True
    norm_eps: float = 1e-5


@dataclass
class DataSchema:
    # "shakespeare" (the default plays), a text file, a dir or a glob. MISSING, not a default:
    # a `???` in a group file cannot override a value the schema already set.
    source: str = MISSING
    cache_dir: str = ".cache/data"
    train_ratio: float = 0.9
    val_ratio: float = 0.1
    # How long the other ranks wait for the first tokenization of the corpus (one rank per node
    # does it); train.dist_timeout_s, sized for training steps, does not bound that wait.
    prep_timeout_s: float = 86400.0


@dataclass
class TrainSchema:
    """lmcore.train.TrainConfig, field for field (tests/unit/test_trainer_config.py checks)."""

    batch_size: int = 16
    grad_accum_steps: int = 1
    max_steps: Optional[int] = 600
    epochs: Optional[float] = None
    max_time_s: Optional[float] = None
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    mixed_precision: str = "auto"
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    eval_interval: int = 100
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 200
    checkpoint_dir: Optional[str] = "checkpoints"
    keep_checkpoints: int = 3
    resume: bool = True
    checkpoint_lock_wait_s: float = 120.0
    model_dir: Optional[str] = None
    peak_flops: float = H100_BF16_PEAK_FLOPS
    progress: bool = True
    dist_timeout_s: float = DEFAULT_TIMEOUT_S
    quantization_report: bool = True


@dataclass
class ServeSchema:
    """The seed's inference keys; the API and worker read the same values from LLM_* variables."""

    model_uri: str = "models:/llm@production"  # the seed's model_path; LLM_MODEL_URI
    kv_cache: bool = True
    quantized: bool = False
    mixed_precision: str = "auto"
    device: str = "auto"  # LLM_DEVICE
    max_batch: int = 8  # LLM_MAX_BATCH
    max_new_tokens: int = 256  # LLM_MAX_NEW_TOKENS


@dataclass
class TrackingSchema:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"  # config.yaml takes it from MLFLOW_TRACKING_URI
    experiment: str = "llm-pipeline"
    register_name: Optional[str] = "llm"


@dataclass
class RootConfig:
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    serve: ServeSchema = field(default_factory=ServeSchema)
    tracking: TrackingSchema = field(default_factory=TrackingSchema)


def register() -> None:
    """Make the schema known to Hydra: config.yaml lists `base_config` first in its defaults."""
    ConfigStore.instance().store(name="base_config", node=RootConfig)


def config_dir() -> Path:
    """config/ of this checkout, or $LLM_CONFIG_DIR (e.g. a ConfigMap mounted in a pod)."""
    env = os.environ.get("LLM_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "config"


def compose(overrides: list[str], config_name: str = "config") -> DictConfig:
    """config/config.yaml + overrides, validated against RootConfig; interpolations unresolved.

    Uses Hydra's compose API rather than @hydra.main, so errors reach the caller (one line on
    stderr, no Hydra traceback) and no outputs/ directory is created.
    """
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            raise ConfigError(f"{key}: not used here (the trainer composes its config with "
                              "Hydra's compose API, which writes no outputs/ and configures no "
                              "logging), so it would change nothing")  # fmt: skip
    directory = config_dir()
    if not (directory / f"{config_name}.yaml").is_file():
        raise ConfigError(f"no {config_name}.yaml in {directory} (set LLM_CONFIG_DIR)")
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        except ValueError as exc:  # Hydra's own, e.g. a number given for a group (model=1)
            raise ConfigError(f"{exc} (a config group takes a name, e.g. model=small)") from exc
    OmegaConf.resolve(cfg)  # a missing env var or a bad interpolation fails here, not mid-run
    return cfg


# -- structured config -> lmcore dataclasses ----------------------------------------------------


def as_dictconfig(cfg: Any) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    if dataclasses.is_dataclass(cfg):
        return OmegaConf.structured(cfg)
    return OmegaConf.merge(OmegaConf.structured(RootConfig), cfg)


def _fields(
    cfg: DictConfig, group: str, schema: type, drop: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A group as a plain dict; keys added with `+group.key=` are still unknown here."""
    values = OmegaConf.to_container(cfg[group], resolve=True, throw_on_missing=True)
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key '{group}.{unknown[0]}' (see config/README.md)")
    return {k: v for k, v in values.items() if k not in drop}


def model_config(cfg: DictConfig, vocab_size: int | None = None) -> ModelConfig:
    """config's model group -> ModelConfig; `vocab_size` (the tokenizer's) wins when given."""
    fields = _fields(cfg, "model", ModelSchema, drop=("name",))
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    try:
        return ModelConfig.from_dict(fields)
    except ConfigError as exc:
        raise ConfigError(f"model.{exc}") from None


def train_config(cfg: DictConfig) -> TrainConfig:
    try:
        return TrainConfig.from_dict(_fields(cfg, "train", TrainSchema))
    except ConfigError as exc:
        raise ConfigError(exc if str(exc).startswith("unknown") else f"train.{exc}") from None


def check_data(cfg: DictConfig) -> None:
    fields = _fields(cfg, "data", DataSchema)
    if not fields["source"].strip():  # Path("") is the current directory
        raise ConfigError("data.source must not be blank (shakespeare, a text file, a directory "
                          "or a glob)")
    for name in ("train_ratio", "val_ratio"):
        if not 0.0 < fields[name] <= 1.0:
            raise ConfigError(f"data.{name} must be in (0, 1], got {fields[name]!r}")
    if fields["train_ratio"] + fields["val_ratio"] > 1.0 + 1e-9:
        raise ConfigError("data.train_ratio + data.val_ratio must be <= 1, got "
                          f"{fields['train_ratio']} + {fields['val_ratio']}")
    if not 0 < fields["prep_timeout_s"] <= MAX_TIMEOUT_S:
        raise ConfigError(f"data.prep_timeout_s must be > 0 and at most {MAX_TIMEOUT_S:.0f} "
                          f"seconds (a year), got {fields['prep_timeout_s']!r}")  # fmt: skip


def check_serve(cfg: DictConfig) -> None:
    """The serve group is for reference (the services read LLM_* variables), but a value there
    that they would refuse is refused here too, rather than written into a run's config."""
    fields = _fields(cfg, "serve", ServeSchema)
    for name in ("max_batch", "max_new_tokens"):
        if not fields[name] >= 1:
            raise ConfigError(f"serve.{name} must be >= 1, got {fields[name]!r}")
    try:
        serve_precision(fields["mixed_precision"], "serve.mixed_precision")
        serve_device(fields["device"], "serve.device")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate(cfg: DictConfig) -> None:
    """Checks beyond types: every key known and set, ranges, one of max_steps/epochs.

    Raises ConfigError (or OmegaConf's MissingMandatoryValue) naming the key.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} must be set (e.g. {missing[0]}=...)")
    for group, node in (("serve", ServeSchema), ("tracking", TrackingSchema)):
        _fields(cfg, group, node)
    unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(RootConfig)})
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}' (see config/README.md)")
    check_serve(cfg)  # serve.device by the services' rule; train.device by TrainConfig's
    model_config(cfg)
    if cfg.model.vocab_size < MIN_VOCAB_SIZE:  # the trainer trains a tokenizer of this size
        raise ConfigError(f"model.vocab_size must be >= {MIN_VOCAB_SIZE} (256 byte tokens + "
                          f"eos), got {cfg.model.vocab_size}")
    train_config(cfg)
    check_data(cfg)
