"""Settings: one LLM_-prefixed class read from the environment, with checked invariants."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services.common.settings import Settings

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("LLM_") or name == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(name)


def test_defaults_work_on_a_laptop() -> None:
    s = Settings()
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.model_uri == "models:/llm@production"
    assert s.api_keys == () and s.mlflow_tracking_uri is None
    assert s.visibility_timeout_s > s.job_time_limit_s


def test_environment_variables_with_the_llm_prefix_are_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_REDIS_URL", "redis://cache:6380/1")
    monkeypatch.setenv("LLM_MAX_BATCH", "32")
    monkeypatch.setenv("LLM_MAX_NEW_TOKENS", "128")
    monkeypatch.setenv("LLM_DEVICE", "cuda:1")
    monkeypatch.setenv("LLM_JOB_TTL_S", "7200")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")

    s = Settings()

    assert (s.redis_url, s.max_batch, s.max_new_tokens) == ("redis://cache:6380/1", 32, 128)
    assert (s.device, s.job_ttl_s) == ("cuda:1", 7200)
    assert s.mlflow_tracking_uri == "http://mlflow:5000"  # MLflow's own variable, no prefix
    assert s.concurrency == 64  # two Celery threads per engine slot by default


def test_api_keys_are_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_API_KEYS", " key-a, key-b ,,")
    assert Settings().api_keys == ("key-a", "key-b")


@pytest.mark.parametrize("value", [",", " , ", " ,, "])
def test_api_keys_of_separators_alone_are_refused_not_taken_as_no_keys(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # A Secret written wrong would otherwise switch authentication off without a word.
    monkeypatch.setenv("LLM_API_KEYS", value)
    with pytest.raises(ValidationError, match="LLM_API_KEYS holds no key"):
        Settings()


@pytest.mark.parametrize("value", ["ok-key,clé-secrète", "tab\tsecret"])
def test_an_api_key_that_could_never_match_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # Servers read header bytes as latin-1 and clients send UTF-8: "clé" could never match.
    monkeypatch.setenv("LLM_API_KEYS", value)
    with pytest.raises(ValidationError, match="LLM_API_KEYS: key [12] holds a control or a "
                       "non-ASCII") as caught:  # fmt: skip
        Settings()
    assert "secr" not in str(caught.value)


def test_api_keys_given_as_a_list_are_checked_too() -> None:
    with pytest.raises(ValidationError, match="key 2 holds"):
        Settings(api_keys=("fine", "naïve"))
    # The Bearer scheme ends at the first space: a key may hold spaces of its own.
    for key in ("a-b_c.d~e+f/g=", "key with space"):
        assert Settings(api_keys=(key,)).api_keys == (key,)


def test_an_empty_api_keys_value_means_no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_API_KEYS", "")  # compose's ${LLM_API_KEYS:-}
    assert Settings().api_keys == ()


@pytest.mark.parametrize("password", ["plain", "p@ss/w0rd", "a#b:c", "x%41y", "ü ber"])
def test_a_redis_password_of_any_characters_reaches_every_client_intact(
    monkeypatch: pytest.MonkeyPatch, password: str
) -> None:
    import redis
    from kombu.utils.url import url_to_parts

    monkeypatch.setenv("LLM_REDIS_URL", "redis://llm-redis.llm.svc:6380/2")
    monkeypatch.setenv("LLM_REDIS_PASSWORD", password)
    url = Settings().redis_url
    for parsed in (redis.connection.parse_url(url), url_to_parts(url)._asdict()):
        assert parsed["password"] == password  # redis-py (API, worker) and kombu (Celery)
        assert parsed.get("host", parsed.get("hostname")) == "llm-redis.llm.svc"


def test_visibility_timeout_must_exceed_the_job_time_limit() -> None:
    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        Settings(visibility_timeout_s=60, job_time_limit_s=60)


def test_a_job_record_must_outlive_the_job_time_limit() -> None:
    with pytest.raises(ValidationError, match="job_ttl_s"):
        Settings(job_ttl_s=300, job_time_limit_s=600)


@pytest.mark.parametrize(
    ("ttl", "visibility", "limit"),
    [(3600, 3600, 600), (4200, 3600, 600), (60, 70, 1), (100, 60, 40)],
    ids=["ttl=visibility", "ttl=visibility+limit", "ttl<visibility", "ttl=sum, small"],
)
def test_settings_refuse_job_ttl_not_above_visibility_timeout(
    ttl: int, visibility: int, limit: float
) -> None:
    # A worker that dies mid-job leaves its message unacked until the visibility timeout; a
    # record that expired by then made the redelivery drop the job (no retry, never failed).
    with pytest.raises(ValidationError) as caught:
        Settings(job_ttl_s=ttl, visibility_timeout_s=visibility, job_time_limit_s=limit)
    message = str(caught.value)
    for name in ("job_ttl_s", "visibility_timeout_s", "job_time_limit_s"):
        assert name in message


def test_a_job_ttl_just_above_visibility_timeout_and_time_limit_is_accepted() -> None:
    assert Settings(job_ttl_s=4201).job_ttl_s == 4201  # the defaults: 3600 + 600
    assert Settings(job_ttl_s=101, visibility_timeout_s=60, job_time_limit_s=40).job_ttl_s == 101


def test_the_shipped_job_ttls_pass_the_settings_rule() -> None:
    # Settings' default, docker-compose's default and the chart's value.
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    chart = yaml.safe_load((REPO / "charts" / "llm" / "values.yaml").read_text())
    ttl = compose["x-app-env"]["LLM_JOB_TTL_S"].split(":-")[1].rstrip("}")
    for value in (Settings().job_ttl_s, ttl, chart["settings"]["jobTtlS"]):
        Settings(job_ttl_s=value)


def test_a_non_numeric_bound_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_MAX_BATCH", "many")
    with pytest.raises(ValidationError, match="max_batch"):
        Settings()


@pytest.mark.parametrize(
    ("value", "on_cpu", "on_gpu"),
    [("auto", False, True), ("true", True, True), ("FALSE", False, False)],
)
def test_compiled_decode_is_on_for_gpus_unless_set(
    monkeypatch: pytest.MonkeyPatch, value: str, on_cpu: bool, on_gpu: bool
) -> None:
    monkeypatch.setenv("LLM_COMPILE_DECODE", value)
    s = Settings()
    assert (s.decode_compiled_on("cpu"), s.decode_compiled_on("cuda")) == (on_cpu, on_gpu)


def test_an_unknown_compile_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_COMPILE_DECODE", "sometimes")
    with pytest.raises(ValidationError, match="compile_decode"):
        Settings()


@pytest.mark.parametrize("value", ["0.0004", "0.5", "nan", "-1"])
def test_a_lease_shorter_than_a_second_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # 0.0004 s would become PX 0, which Redis rejects, and no job could ever be claimed.
    monkeypatch.setenv("LLM_LEASE_TTL_S", value)
    with pytest.raises(ValidationError, match="LLM_LEASE_TTL_S must be at least 1 s"):
        Settings()


def test_a_one_second_lease_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_LEASE_TTL_S", "1")
    assert Settings().lease_ttl_s == 1.0


@pytest.mark.parametrize("value", ["0", "0.5", "nan", "-1"])
def test_an_engine_stall_bound_under_a_second_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # 0 or NaN would be no bound, and under a second ordinary steps would count as a hang.
    monkeypatch.setenv("LLM_ENGINE_STALL_S", value)
    with pytest.raises(ValidationError, match="LLM_ENGINE_STALL_S must be at least 1 s"):
        Settings()


def test_the_shipped_engine_stall_bounds_pass_the_settings_rule() -> None:
    # Settings' default (far above a compile or a CPU prefill of the largest preset, below the
    # job time limit) and the chart's value.
    chart = yaml.safe_load((REPO / "charts" / "llm" / "values.yaml").read_text())
    assert Settings().engine_stall_s == 300 < Settings().job_time_limit_s
    assert Settings(engine_stall_s=chart["settings"]["engineStallS"]).engine_stall_s == 300


# Ids spell the value out: a bare "gpu" id would read as conftest's `gpu` marker and skip.
@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "cuda1", "tpu", ""],
                         ids=lambda v: f"LLM_DEVICE={v!r}")
def test_an_unknown_device_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("LLM_DEVICE", value)
    with pytest.raises(ValidationError, match="LLM_DEVICE must be auto, cpu, cuda"):
        Settings()


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps", " CUDA:1 "])
def test_devices_torch_accepts_are_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    import torch

    monkeypatch.setenv("LLM_DEVICE", value)
    device = Settings().device
    assert device == value.strip().lower()
    if device != "auto":
        torch.device(device)  # the worker's pick_device passes it straight to torch


def test_new_jobs_are_refused_at_nine_tenths_of_redis_maxmemory_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().redis_memory_watermark == 0.9
    monkeypatch.setenv("LLM_REDIS_MEMORY_WATERMARK", "1")  # at the cap itself: allowed
    assert Settings().redis_memory_watermark == 1.0


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "90", "nan", "inf"])
def test_a_memory_watermark_outside_0_to_1_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # 90 (a percentage) would never refuse a job, and 0 would refuse every one.
    monkeypatch.setenv("LLM_REDIS_MEMORY_WATERMARK", value)
    with pytest.raises(ValidationError, match="LLM_REDIS_MEMORY_WATERMARK must be above 0 and "
                                              "at most 1"):  # fmt: skip
        Settings()


def test_a_non_numeric_memory_watermark_names_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_REDIS_MEMORY_WATERMARK", "90%")
    with pytest.raises(ValidationError, match="redis_memory_watermark"):
        Settings()
