"""The pyfunc's input handling: every accepted shape becomes one row per prompt."""

from __future__ import annotations

import numpy as np
import pytest

from lmcore.mlflow_pyfunc import row_prompt, rows_from_input, sampling_params

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


def test_a_row_without_a_prompt_is_an_error_naming_the_row_not_the_text_nan() -> None:
    # A DataFrame built from rows where one lacks "prompt" holds NaN there.
    rows = [{"prompt": "a"}, {"prompt": float("nan")}, {"prompt": None}, {"prompt": 3}]
    assert row_prompt(rows[0], 0) == "a"
    for index in (1, 2):
        with pytest.raises(ValueError, match=f"row {index}: prompt is missing"):
            row_prompt(rows[index], index)
    with pytest.raises(ValueError, match="row 3: prompt must be a string, got int"):
        row_prompt(rows[3], 3)


@pytest.mark.parametrize(("name", "value"), [("max_new_tokens", 2.9), ("top_k", 0.5),
                                             ("seed", 1.7), ("seed", "1.5")])  # fmt: skip
def test_a_fraction_in_a_whole_number_column_is_refused_not_truncated(name: str,
                                                                     value: object) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a whole number"):
        sampling_params({"prompt": "a", name: value})


def test_whole_numbers_arrive_from_ints_numpy_integral_floats_and_digit_strings() -> None:
    row = {"max_new_tokens": np.int64(5), "top_k": 3.0, "seed": "7", "temperature": np.float32(0.5)}
    params = sampling_params(row)
    assert (params.max_new_tokens, params.top_k, params.seed) == (5, 3, 7)
    assert params.temperature == 0.5
