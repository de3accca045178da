"""ModelConfig validation and presets."""

from __future__ import annotations

import pytest

from lmcore.config import PRESETS, ConfigError, ModelConfig, preset
from lmcore.model import Transformer

pytestmark = pytest.mark.unit


def test_vocab_is_padded_to_a_multiple_of_64() -> None:
    assert ModelConfig(vocab_size=50257).padded_vocab_size == 50304
    assert ModelConfig(vocab_size=512).padded_vocab_size == 512


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_layer", 0), ("n_head", -1), ("block_size", 0), ("dropout", 1.5), ("mlp", "relu"),
     # Wrong types: strings used to raise a bare TypeError, or pass as a truthy flag.
     ("dropout", "0.1"), ("dropout", True), ("norm_eps", "1e-5"), ("norm_eps", None),
     ("bias", "false"), ("bias", 0), ("tie_embeddings", "no"), ("tie_embeddings", 1),
     ("n_layer", 2.0), ("norm_eps", float("inf")), ("norm_eps", float("nan"))],  # fmt: skip
)
def test_invalid_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{field: value})


def test_whole_numbers_are_accepted_where_a_float_is_expected() -> None:
    cfg = ModelConfig(dropout=0, norm_eps=1)
    assert (cfg.dropout, cfg.norm_eps) == (0, 1)


def test_heads_must_divide_width() -> None:
    with pytest.raises(ConfigError, match="n_head"):
        ModelConfig(n_embd=100, n_head=3)


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ConfigError, match="n_layers"):
        ModelConfig.from_dict({"n_layers": 4})


def test_dict_round_trip() -> None:
    cfg = preset("small")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_presets_have_the_promised_shapes() -> None:
    gpt2 = PRESETS["gpt2-124m"]
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.block_size) == (12, 12, 768, 1024)
    small = Transformer(preset("small"))
    # "about 10M parameters" (non-embedding; the 8192-token embedding adds ~3M more).
    assert 8e6 < small.num_params() < 12e6
    with pytest.raises(ConfigError, match="huge"):
        preset("huge")
