"""The pyfunc's input handling: every accepted shape becomes one row per prompt, and MLflow's
inference params set what the rows leave out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmcore.checkpoint import CheckpointError
from lmcore.generate import SamplingParams, generate
from lmcore.mlflow_pyfunc import (
    LmPredictor,
    row_prompt,
    rows_from_input,
    sampling_params,
    signature,
)
from tests.helpers.services import make_model_dir

pytestmark = pytest.mark.unit

SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> LmPredictor:
    predictor = LmPredictor()
    predictor.load(str(make_model_dir(tmp_path_factory.mktemp("pyfunc") / "model")))
    return predictor


def test_a_model_dir_without_a_tokenizer_is_refused_at_load_not_at_every_predict(
    tmp_path: Path,
) -> None:
    # It used to load, then every predict raised AttributeError (served: a 500 each request).
    model_dir = make_model_dir(tmp_path / "model")
    (model_dir / "tokenizer.json").unlink()
    predictor = LmPredictor()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        predictor.load(str(model_dir))
    assert predictor.loaded is None


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


def test_whole_numbers_arrive_from_numpy_float32_columns() -> None:
    rows = rows_from_input({"prompt": ["a", "b"], "top_k": np.float32(3.0),
                            "max_new_tokens": np.array([4.0, np.nan], dtype=np.float32),
                            "seed": np.array([7.0, 8.0], dtype=np.float32)})  # fmt: skip
    params = [sampling_params(row) for row in rows]
    # A NaN in a float32 column is a gap, as in a pandas column: the default applies.
    assert [(p.max_new_tokens, p.top_k, p.seed) for p in params] == [(4, 3, 7), (64, 3, 8)]
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number"):
        sampling_params({"prompt": "a", "max_new_tokens": np.float32(2.5)})


def test_the_signature_declares_every_setting_as_a_param_with_sampling_params_default() -> None:
    from mlflow.models import ModelSignature

    declared = signature().params
    assert declared is not None  # without a schema MLflow drops params with a warning
    specs = {spec.name: spec for spec in declared.params}
    assert tuple(specs) == SETTINGS
    defaults = SamplingParams()
    for name in SETTINGS[:-1]:
        assert specs[name].default == getattr(defaults, name), name
    assert specs["stop"].default == [] and specs["stop"].shape == (-1,)
    # What the MLmodel file stores reads back the same.
    assert ModelSignature.from_dict(signature().to_dict()).params == declared


def test_params_set_the_settings_of_rows_without_their_own_and_row_values_win(
    predictor: LmPredictor,
) -> None:
    rows = [{"prompt": "First Citizen"}, {"prompt": "All: Speak", "max_new_tokens": 3, "seed": 5}]
    params = {"max_new_tokens": 2, "seed": 9, "top_k": 20, "stop": []}
    texts = predictor.predict(rows, params=params)

    loaded = predictor.loaded
    expected = generate(loaded.model, loaded.tokenizer, [r["prompt"] for r in rows],
                        [SamplingParams(max_new_tokens=2, seed=9, top_k=20),
                         SamplingParams(max_new_tokens=3, seed=5, top_k=20)])  # fmt: skip
    assert [len(g.token_ids) for g in expected] == [2, 3]
    assert texts == [g.text for g in expected]


@pytest.mark.parametrize("params", [{"max_tokens": 2}, {"seed": 1, "n": 2}])
def test_an_unknown_param_is_an_error_naming_it(predictor: LmPredictor, params: dict) -> None:
    unknown = next(name for name in params if name not in SETTINGS)
    with pytest.raises(ValueError, match=f"unknown param.* {unknown}"):
        predictor.predict([{"prompt": "a"}], params=params)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"top_k": 1.5}, "top_k must be a whole number"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"stop": [""]}, "stop must hold"),
        ({"stop": 5}, "stop must be a string"),
    ],
)
def test_an_invalid_param_is_an_error_naming_the_field_even_if_every_row_sets_it(
    predictor: LmPredictor, params: dict, message: str
) -> None:
    row = {"prompt": "a", "max_new_tokens": 1, "temperature": 0.0, "top_k": 0, "top_p": 1.0}
    with pytest.raises(ValueError, match=f"params: {message}"):
        predictor.predict([row], params=params)
