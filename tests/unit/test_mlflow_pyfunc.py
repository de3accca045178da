"""The pyfunc's input handling: every accepted shape becomes one row per prompt."""

from __future__ import annotations

import numpy as np
import pytest

from lmcore.mlflow_pyfunc import rows_from_input, sampling_params

pytestmark = pytest.mark.unit


def test_a_dict_of_columns_repeats_single_values_for_every_prompt() -> None:
    rows = rows_from_input({"prompt": ["a", "b"], "max_new_tokens": 5, "seed": [7],
                            "temperature": [0.0, 1.0]})  # fmt: skip
    assert rows == [
        {"prompt": "a", "max_new_tokens": 5, "seed": 7, "temperature": 0.0},
        {"prompt": "b", "max_new_tokens": 5, "seed": 7, "temperature": 1.0},
    ]
    assert [sampling_params(r).max_new_tokens for r in rows] == [5, 5]


def test_a_dict_of_numpy_columns_is_read_like_lists() -> None:
    rows = rows_from_input({"prompt": np.array(["a", "b"]), "top_k": np.int64(3)})
    assert [(r["prompt"], r["top_k"]) for r in rows] == [("a", 3), ("b", 3)]


def test_a_single_prompt_dict_is_one_row() -> None:
    assert rows_from_input({"prompt": "a", "seed": 1}) == [{"prompt": "a", "seed": 1}]


def test_a_column_neither_single_nor_one_per_prompt_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="seed need one value or one per prompt"):
        rows_from_input({"prompt": ["a", "b", "c"], "seed": [1, 2]})
