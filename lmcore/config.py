"""Model configuration: one frozen dataclass and the named presets the project ships.

Pure data and validation; it must not touch torch so configs load anywhere (API, CLI, Helm tools).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

MlpKind = Literal["swiglu", "gelu"]
VOCAB_MULTIPLE = 64  # tensor-core friendly embedding and head sizes


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def dataclass_from_dict(cls: type, data: dict[str, Any], what: str) -> Any:
    """cls(**data), refusing unknown fields by name (shared by the model and train configs)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what} config field(s): {', '.join(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    dropout: float = 0.0
    mlp: MlpKind = "swiglu"
    bias: bool = False
    tie_embeddings: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("dropout", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        for name in ("bias", "tie_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # "false" from a hand-written file is truthy
                raise ConfigError(f"{name} must be true or false, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ConfigError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):  # inf zeroes every norm
            raise ConfigError(f"norm_eps must be positive and finite, got {self.norm_eps!r}")

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of 64."""
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU keeps the GELU MLP's parameter count: 2/3 of 4x, rounded to 64."""
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return -(-int(8 * self.n_embd / 3) // 64) * 64

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, data, "model")

    def replace(self, **changes: Any) -> ModelConfig:
        return self.from_dict({**self.to_dict(), **changes})


PRESETS: dict[str, ModelConfig] = {
    # For tests: trains in seconds on one CPU core.
    "tiny": ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_embd=64, block_size=128),
    # The CPU demo: about 10M parameters with the default 8192-token vocabulary.
    "small": ModelConfig(vocab_size=8192, n_layer=6, n_head=6, n_embd=384, block_size=256),
    # GPT-2 small's shape, for GPU training and MFU measurements.
    "gpt2-124m": ModelConfig(
        vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with optional field overrides (e.g. the tokenizer's vocab_size)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
