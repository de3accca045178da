"""MLflow inference `params` through the logged pyfunc: loaded with mlflow.pyfunc.load_model and
served by MLflow's own scoring app (what `mlflow models serve` runs), from a SQLite store."""

from __future__ import annotations

from typing import Any

import pytest

from lmcore.generate import SamplingParams, generate
from lmcore.tracking import MlflowTracker
from tests.helpers.services import make_model_dir

pytestmark = pytest.mark.integration

PROMPTS = ["First Citizen", "All: Speak"]


@pytest.fixture(scope="module")
def pyfunc(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The registered model as MLflow loads it (logged by MlflowTracker, as the trainer does)."""
    import mlflow.pyfunc

    root = tmp_path_factory.mktemp("pyfunc-params")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = MlflowTracker(uri)
    tracker.start_run("params")
    tracker.log_model_dir(make_model_dir(root / "model"), register_name="llm-params")
    tracker.end_run()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_REGISTRY_URI", uri)
        return mlflow.pyfunc.load_model("models:/llm-params@candidate")


def expected_texts(pyfunc: Any, params: list[SamplingParams]) -> list[str]:
    loaded = pyfunc.unwrap_python_model().predictor.loaded
    outs = generate(loaded.model, loaded.tokenizer, PROMPTS, params)
    assert [len(g.token_ids) for g in outs] == [p.max_new_tokens for p in params]
    return [g.text for g in outs]


def test_pyfunc_params_set_sampling_for_rows_without_their_own_values(pyfunc: Any) -> None:
    import pandas as pd

    # The second row's own max_new_tokens and seed win; pandas leaves NaN in the first's cells.
    frame = pd.DataFrame([{"prompt": PROMPTS[0]},
                          {"prompt": PROMPTS[1], "max_new_tokens": 3, "seed": 5}])  # fmt: skip
    texts = pyfunc.predict(frame, params={"max_new_tokens": 2, "seed": 9, "top_k": 20})

    assert texts == expected_texts(pyfunc, [SamplingParams(max_new_tokens=2, seed=9, top_k=20),
                                            SamplingParams(max_new_tokens=3, seed=5, top_k=20)])


def test_a_served_request_s_params_reach_the_model(pyfunc: Any) -> None:
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    client = TestClient(scoring_server.init(pyfunc))
    body = {"dataframe_records": [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "seed": 5}],
            "params": {"max_new_tokens": 2, "temperature": 0.5, "seed": 9}}  # fmt: skip
    reply = client.post("/invocations", json=body)

    assert reply.status_code == 200, reply.text
    params = SamplingParams(max_new_tokens=2, temperature=0.5, seed=9)
    assert reply.json()["predictions"] == expected_texts(
        pyfunc, [params, SamplingParams(max_new_tokens=2, temperature=0.5, seed=5)]
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
     ({"max_new_tokens": "many"}, "max_new_tokens"),
     ({"stop": [""]}, "stop must hold")],
)  # fmt: skip
def test_a_served_request_with_a_bad_param_is_a_400_naming_the_field(
    pyfunc: Any, params: dict, message: str
) -> None:
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    client = TestClient(scoring_server.init(pyfunc))
    body = {"dataframe_records": [{"prompt": PROMPTS[0]}], "params": params}
    reply = client.post("/invocations", json=body)

    assert reply.status_code == 400
    assert message in reply.json()["message"]
