"""lmcore: the model library of llm-pipeline (model, cache, generation, data, training).

Imports only torch, numpy, tokenizers and safetensors at module level, so it runs on a bare GPU box.
"""

from lmcore.config import PRESETS, ConfigError, ModelConfig, preset

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "preset"]
