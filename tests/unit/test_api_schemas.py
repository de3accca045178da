"""The job contract's pydantic models: request bounds, Redis hash round trip, the job view."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from services.api.schemas import JobView, job_request_model, legacy_request_models
from services.common.jobs import JobRecord, JobRequest, JobStatus, ModelRef, fingerprint
from services.common.settings import Settings

pytestmark = pytest.mark.unit


def errors_for(model: type, data: dict[str, Any]) -> list[tuple[Any, ...]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return [e["loc"] for e in info.value.errors()]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 1.5}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ["a"] * 5}, "stop"),
        ({"seed": 2**53}, "seed"),
        ({"eos": "yes"}, "eos"),
        ({"truncate": "middle"}, "truncate"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_out_of_bounds_fields_are_rejected_by_name(data: dict[str, Any], field: str) -> None:
    assert any(loc[0] == field for loc in errors_for(JobRequest, data))


def test_per_app_request_model_enforces_the_configured_limits() -> None:
    model = job_request_model(Settings(max_new_tokens=32, max_prompt_chars=10))

    assert ("max_new_tokens",) in errors_for(model, {"max_new_tokens": 33})
    assert ("prompt",) in errors_for(model, {"prompt": "x" * 11})
    assert model.model_validate({}).max_new_tokens == 32  # default clipped to the limit
    schema = model.model_json_schema()["properties"]
    assert schema["max_new_tokens"]["maximum"] == 32  # the OpenAPI schema says so too
    with_prompt, without_prompt = legacy_request_models(Settings(max_new_tokens=8))
    assert ("num_of_token_generated",) in errors_for(without_prompt, {"num_of_token_generated": 9})


@pytest.mark.parametrize(
    "model",
    [JobRequest, job_request_model(Settings()), legacy_request_models(Settings())[0]],
    ids=["base", "served", "seed endpoint"],
)
def test_lone_surrogates_become_replacement_characters(model: type) -> None:
    # The served models add a length limit, which makes pydantic check the string's encoding
    # before an after-validator would see it: the repair must come first.
    data = {"prompt": "a\ud800b"}
    if "num_of_token_generated" in model.model_fields:  # the seed's request
        data["num_of_token_generated"] = 1
    req = model.model_validate(data)
    assert req.prompt == "a\ufffdb"
    req.prompt.encode("utf-8")  # the tokenizer can take it
    if model is JobRequest:
        assert JobRequest.model_validate({"stop": ["\udc00"]}).stop == ["\ufffd"]


def test_sampling_fields_build_lmcore_sampling_params() -> None:
    from lmcore.generate import SamplingParams

    req = JobRequest(max_new_tokens=5, temperature=0.0, top_k=3, top_p=0.5, seed=1, stop=["\n"])
    params = SamplingParams(**req.sampling_kwargs())
    assert params.stop == ("\n",) and params.seed == 1 and params.temperature == 0.0


def test_fingerprint_depends_on_meaning_not_on_key_order() -> None:
    a = JobRequest.model_validate({"prompt": "x", "top_k": 5})
    b = JobRequest.model_validate({"top_k": 5, "prompt": "x"})
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(JobRequest(prompt="x", top_k=6))


def test_job_record_round_trips_through_a_redis_hash() -> None:
    record = JobRecord.new("job-1", JobRequest(prompt="hi", seed=3, stop=["."]))
    record = record.model_copy(update={
        "status": JobStatus.succeeded, "started_at": record.created_at + 1.0,
        "first_token_at": record.created_at + 1.5, "finished_at": record.created_at + 3.0,
        "text": "there", "completion_tokens": 4, "prompt_tokens": 1, "finish_reason": "length",
        "model": ModelRef(name="llm", version="2", run_id="abc"), "attempts": 1,
        "engine_s": 1.9,
    })  # fmt: skip

    data = record.to_hash()

    assert all(isinstance(v, str) for v in data.values())
    assert JobRecord.from_hash(data) == record


def test_job_view_reports_result_timings_and_model() -> None:
    record = JobRecord.new("job-2", JobRequest(prompt="hi"))
    t0 = record.created_at
    record = record.model_copy(update={
        "status": JobStatus.succeeded, "started_at": t0 + 0.5, "first_token_at": t0 + 0.75,
        "finished_at": t0 + 2.5, "text": "yo", "completion_tokens": 10,
        "finish_reason": "eos", "model": ModelRef(name="llm", version="7"),
    })  # fmt: skip

    view = JobView.from_record(record)

    assert view.result is not None and view.result.text == "yo"
    assert view.timings.queued_s == pytest.approx(0.5)
    assert view.timings.time_to_first_token_s == pytest.approx(0.75)
    assert view.timings.total_s == pytest.approx(2.5)
    assert view.timings.tokens_per_s == pytest.approx(5.0)
    assert view.model is not None and view.model.version == "7"
    assert view.links.events == "/jobs/job-2/events"


def test_a_queued_job_has_no_result_yet() -> None:
    view = JobView.from_record(JobRecord.new("job-3", JobRequest()))
    assert view.status == JobStatus.queued and view.result is None
    assert view.timings.queued_s is None
