"""The MLflow pyfunc wrapper (prompt in, text out), logged as an MLflow "model from code" file.

MLflow executes this file to load the model, so nothing is pickled; importing it as
`lmcore.mlflow_pyfunc` must not import mlflow (lmcore's import rule), only MLflow's loader does.
"""

from __future__ import annotations

import math
import operator
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


def signature() -> Any:
    """The pyfunc signature: a "prompt" string column (+ optional sampling columns) -> text.

    Input as a DataFrame, a list of row dicts or a dict of columns (a bare list of strings has
    no column name, so MLflow's schema check rejects it).
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    # "any" for the sampling settings: pandas turns an int column with gaps into floats (NaN) and
    # MLflow will not cast int to double, so typed columns reject valid input either way;
    # sampling_params casts and SamplingParams validates.
    inputs = [ColSpec("string", "prompt")] + [
        ColSpec(AnyType(), name, required=False) for name in OPTIONAL_COLUMNS
    ]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([ColSpec("string")]))


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
    # pandas fills a gap in a column with NaN (or None in an object column).
    return value is None or (isinstance(value, float) and math.isnan(value))


def whole_number(name: str, value: Any) -> int:
    """value as an int, refusing a fraction: int(2.9) would quietly ask for 2 tokens, and
    int(0.5) would turn top_k off. Integral floats are fine (pandas makes them from gaps)."""
    try:
        return operator.index(value)  # int and numpy integers
    except TypeError:
        pass
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    raise ValueError(f"{name} must be a whole number, got {value!r}")


def sampling_params(row: dict[str, Any]) -> SamplingParams:
    """A row's SamplingParams; missing or NaN cells (pandas fills gaps with NaN) use defaults."""
    given: dict[str, Any] = {}
    for name, cast in OPTIONAL_COLUMNS.items():
        value = row.get(name)
        if _missing(value):
            continue
        given[name] = whole_number(name, value) if cast is int else cast(value)
    given.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
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
        import torch

        from lmcore.checkpoint import load_model_dir

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.loaded = load_model_dir(model_dir, device=device)

    def predict(self, model_input: Any) -> list[str]:
        from lmcore.generate import generate

        rows = rows_from_input(model_input)
        prompts = [row_prompt(row, i) for i, row in enumerate(rows)]
        params = [sampling_params(row) for row in rows]
        # truncate="left": a served model keeps the prompt's end rather than failing.
        outs = generate(self.loaded.model, self.loaded.tokenizer, prompts, params, truncate="left")
        return [g.text for g in outs]


def _python_model() -> Any:
    """The mlflow.pyfunc.PythonModel subclass, built only when MLflow runs this file."""
    import mlflow.pyfunc

    class LmPyfunc(mlflow.pyfunc.PythonModel):
        # The signature logged with the model validates inputs; this skips MLflow's second,
        # type-hint based check (and its warning that predict has no hints).
        _skip_type_hint_validation = True

        def load_context(self, context: Any) -> None:
            self.predictor = LmPredictor()
            self.predictor.load(context.artifacts[MODEL_DIR_ARTIFACT])

        # No type hints: MLflow would infer a second schema from them at logging time.
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            return self.predictor.predict(model_input)

    return LmPyfunc()


if __name__ != "lmcore.mlflow_pyfunc":
    # Run by MLflow's models-from-code loader (a generated module name), not imported.
    import mlflow.models

    mlflow.models.set_model(_python_model())
