"""The MLflow pyfunc wrapper (prompt in, text out), logged as an MLflow "model from code" file.

MLflow executes this file to load the model, so nothing is pickled; importing it as
`lmcore.mlflow_pyfunc` must not import mlflow (lmcore's import rule), only MLflow's loader does.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping
from typing import Any

from lmcore.generate import SamplingParams

MODEL_DIR_ARTIFACT = "model_dir"  # the key of the model dir in the pyfunc's artifacts
DEFAULT_MAX_NEW_TOKENS = 64
# Optional per-row columns beside "prompt", and the type each is cast to.
OPTIONAL_COLUMNS: dict[str, type] = {
    "max_new_tokens": int,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
}
# MLflow inference `params` (predict(df, params={...}), "params" in a served request): the same
# settings for every row that has no value of its own, and stop strings for all rows.
PARAMS: dict[str, type] = {**OPTIONAL_COLUMNS, "stop": tuple}


def signature() -> Any:
    """The pyfunc signature: a "prompt" string column (+ optional sampling columns) -> text.

    Input as a DataFrame, a list of row dicts or a dict of columns (a bare list of strings has
    no column name, so MLflow's schema check rejects it). `params` are declared too: MLflow drops
    those of a model without a params schema (only a warning), and fills in a declared param's
    default when a request leaves it out; the defaults are SamplingParams' own.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    # "any" for the sampling settings: pandas turns an int column with gaps into floats (NaN) and
    # MLflow will not cast int to double, so typed columns reject valid input either way;
    # sampling_params casts and SamplingParams validates.
    inputs = [ColSpec("string", "prompt")] + [
        ColSpec(AnyType(), name, required=False) for name in OPTIONAL_COLUMNS
    ]
    defaults = SamplingParams(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    params = [
        ParamSpec(name, "long" if cast is int else "double", getattr(defaults, name))
        for name, cast in OPTIONAL_COLUMNS.items()
    ] + [ParamSpec("stop", "string", list(defaults.stop), shape=(-1,))]  # a list of strings
    return ModelSignature(
        inputs=Schema(inputs), outputs=Schema([ColSpec("string")]), params=ParamSchema(params)
    )


def rows_from_input(model_input: Any) -> list[dict[str, Any]]:
    """Accept a DataFrame, a list of prompts or of row dicts, a dict of columns (a single value
    applies to every prompt), or one string."""
    if hasattr(model_input, "to_dict"):  # pandas DataFrame
        return list(model_input.to_dict(orient="records"))
    if isinstance(model_input, str):
        return [{"prompt": model_input}]
    if isinstance(model_input, dict):
        columns = {k: _column(v) for k, v in model_input.items()}
        n = len(columns.get("prompt", []))
        # One value (a scalar or a one-item list) applies to every prompt.
        columns = {k: v * n if len(v) == 1 else v for k, v in columns.items()}
        uneven = sorted(k for k, v in columns.items() if len(v) != n)
        if uneven:
            raise ValueError(f"column(s) {', '.join(uneven)} need one value or one per prompt "
                             f"({n})")  # fmt: skip
        return [{k: v[i] for k, v in columns.items()} for i in range(n)]
    return [row if isinstance(row, dict) else {"prompt": row} for row in model_input]


def _column(value: Any) -> list[Any]:
    if isinstance(value, list | tuple) or getattr(value, "ndim", 0) == 1:  # numpy arrays too
        return list(value)
    return [value]


def _missing(value: Any) -> bool:
    # pandas fills a gap in a column with NaN (or None in an object column); numpy's float32
    # columns hold NaN too.
    return value is None or (isinstance(value, numbers.Real) and math.isnan(value))


def whole_number(name: str, value: Any) -> int:
    """value as an int, refusing a fraction: int(2.9) would quietly ask for 2 tokens, and
    int(0.5) would turn top_k off. Integral floats are fine (pandas makes them from gaps), numpy's
    float32 and float64 too."""
    try:
        return operator.index(value)  # int and numpy integers
    except TypeError:
        pass
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    raise ValueError(f"{name} must be a whole number, got {value!r}")


def _number(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _settings(values: Mapping[str, Any], names: Mapping[str, type]) -> dict[str, Any]:
    """The settings in `values` among `names`, cast; missing or NaN ones are left out."""
    given: dict[str, Any] = {}
    for name, cast in names.items():
        value = values.get(name)
        if _missing(value):
            continue
        if cast is int:
            given[name] = whole_number(name, value)
        elif cast is float:
            given[name] = _number(name, value)
        else:  # stop: one string or a list of them (a numpy array from a request too)
            list_like = isinstance(value, list | tuple) or getattr(value, "ndim", 0) == 1
            given[name] = tuple(value) if list_like else value
    return given


def params_settings(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """MLflow's inference `params` as settings for the rows without their own: an unknown name or
    an invalid value is an error naming it (SamplingParams' own checks), even if no row uses it."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict, got {type(params).__name__}")
    unknown = sorted(str(name) for name in params if name not in PARAMS)
    if unknown:
        raise ValueError(f"unknown param(s) {', '.join(unknown)}; known: {', '.join(PARAMS)}")
    try:
        given = _settings(params, PARAMS)
        SamplingParams(**{"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **given})
    except ValueError as e:
        raise ValueError(f"params: {e}") from None
    return given


def sampling_params(
    row: dict[str, Any], defaults: Mapping[str, Any] | None = None
) -> SamplingParams:
    """A row's SamplingParams: its own cells win, then `defaults` (from params_settings), then
    SamplingParams' defaults; missing or NaN cells (pandas fills gaps with NaN) have no value."""
    given = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **(defaults or {})}
    given.update(_settings(row, OPTIONAL_COLUMNS))
    return SamplingParams(**given)


def row_prompt(row: dict[str, Any], index: int) -> str:
    """The row's prompt; a row without one is an error, not the text "nan" or "None"."""
    prompt = row.get("prompt")
    if _missing(prompt):
        raise ValueError(f"row {index}: prompt is missing")
    if not isinstance(prompt, str):
        raise ValueError(f"row {index}: prompt must be a string, got {type(prompt).__name__}")
    return prompt


class LmPredictor:
    """Loads a model dir once and generates for a batch of prompt rows."""

    def __init__(self) -> None:
        self.loaded: Any = None

    def load(self, model_dir: str) -> None:
        """Load the model dir; CheckpointError if it is broken or has no tokenizer.json (every
        predict would fail), as the CLI and the worker refuse it."""
        import torch

        from lmcore.checkpoint import CheckpointError, load_model_dir

        device = "cuda" if torch.cuda.is_available() else "cpu"
        loaded = load_model_dir(model_dir, device=device)
        if loaded.tokenizer is None:
            raise CheckpointError(f"{model_dir} has no tokenizer.json; the pyfunc needs one")
        self.loaded = loaded

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> list[str]:
        """Text for each prompt row; `params` (MLflow's) set what a row leaves out."""
        from lmcore.generate import generate

        defaults = params_settings(params)
        rows = rows_from_input(model_input)
        prompts = [row_prompt(row, i) for i, row in enumerate(rows)]
        settings = [sampling_params(row, defaults) for row in rows]
        # truncate="left": a served model keeps the prompt's end rather than failing.
        loaded = self.loaded
        outs = generate(loaded.model, loaded.tokenizer, prompts, settings, truncate="left")
        return [g.text for g in outs]


def _python_model() -> Any:
    """The mlflow.pyfunc.PythonModel subclass, built only when MLflow runs this file."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    class LmPyfunc(mlflow.pyfunc.PythonModel):
        # The signature logged with the model validates inputs; this skips MLflow's second,
        # type-hint based check (and its warning that predict has no hints).
        _skip_type_hint_validation = True

        def load_context(self, context: Any) -> None:
            self.predictor = LmPredictor()
            self.predictor.load(context.artifacts[MODEL_DIR_ARTIFACT])

        # No type hints: MLflow would infer a second schema from them at logging time. MLflow has
        # checked `params` against the signature's schema and filled in the defaults.
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            try:
                return self.predictor.predict(model_input, params)
            except ValueError as e:
                # Bad input: served, a plain error would reach the client as "unexpected error
                # while evaluating the model", the field it names only in a stack trace.
                raise MlflowException.invalid_parameter_value(str(e)) from e

    return LmPyfunc()


if __name__ != "lmcore.mlflow_pyfunc":
    # Run by MLflow's models-from-code loader (a generated module name), not imported.
    import mlflow.models

    mlflow.models.set_model(_python_model())
