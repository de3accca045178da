"""docker-compose.yml validated offline: Debian's docker-compose (`config`, no engine needed), the
Compose spec schema, and the laptop stack's promises (AOF Redis, MLflow with a volume, the API
waiting for a healthy Redis, GPU and training profiles)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from services.common.settings import Settings
from services.stack import STREAM_NODE_MAX_BYTES
from tests.deploy.conftest import REPO, schema_path
from tests.deploy.entrypoints import parse_dockerfile

pytestmark = pytest.mark.deploy

COMPOSE = REPO / "docker-compose.yml"
PROFILES = ("gpu", "train")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def run_compose(binary: str, file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [binary, "--project-directory", str(REPO), "-f", str(file)]
    for profile in PROFILES:
        cmd += ["--profile", profile]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120, cwd=REPO)


def test_docker_compose_config_validates_the_file(docker_compose: str) -> None:
    proc = run_compose(docker_compose, COMPOSE, "config", "--quiet")
    assert proc.returncode == 0, proc.stderr
    services = run_compose(docker_compose, COMPOSE, "config", "--services")
    assert set(services.stdout.split()) == {
        "redis",
        "mlflow-migrate",
        "mlflow",
        "api",
        "worker",
        "worker-gpu",
        "trainer",
    }


def test_docker_compose_config_rejects_a_broken_file(docker_compose: str, tmp_path: Path) -> None:
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["api"]["depends_on"]["redis"]["condition"] = "service_sleepy"
    broken["services"]["api"]["portz"] = ["8000:8000"]
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    assert run_compose(docker_compose, path, "config", "--quiet").returncode != 0


def test_compose_file_matches_the_compose_spec_schema(compose: dict) -> None:
    schema = json.loads(schema_path("compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    broken = yaml.safe_load(yaml.safe_dump(compose))
    broken["services"]["redis"]["helthcheck"] = {}
    assert list(validator.iter_errors(broken)), "the schema check must reject unknown keys"


def test_redis_keeps_an_append_only_file_on_a_volume(compose: dict) -> None:
    redis = compose["services"]["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(
        v.endswith(":/data") and v.split(":")[0] in compose["volumes"] for v in redis["volumes"]
    )
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_redis_keeps_each_jobs_events_stream_in_a_small_node(compose: dict) -> None:
    # As the chart and `lmctl stack up`: with Redis's default (4096) each job's few-entry events
    # stream held a 4 KB node for the job's whole TTL.
    cmd = compose["services"]["redis"]["command"]
    assert cmd[cmd.index("--stream-node-max-bytes") + 1] == str(STREAM_NODE_MAX_BYTES)


def test_mlflow_serves_sqlite_and_artifacts_from_a_volume(compose: dict) -> None:
    mlflow = compose["services"]["mlflow"]
    cmd = mlflow["command"]
    assert "--backend-store-uri=sqlite:////mlflow/mlflow.db" in cmd
    assert "--artifacts-destination=/mlflow/artifacts" in cmd
    assert any(v.split(":") == ["mlflow-data", "/mlflow"] for v in mlflow["volumes"])
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    allowed = mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "mlflow:5000" in allowed  # the Host header other containers send


def test_mlflow_starts_after_its_database_is_brought_to_its_schema(compose: dict) -> None:
    services = compose["services"]
    migrate, mlflow = services["mlflow-migrate"], services["mlflow"]
    assert migrate["image"] == mlflow["image"]  # the MLflow version the server runs
    assert migrate["command"] == ["mlflow", "db", "upgrade", "sqlite:////mlflow/mlflow.db"]
    assert "--backend-store-uri=sqlite:////mlflow/mlflow.db" in mlflow["command"]
    assert migrate["volumes"] == mlflow["volumes"]
    assert "restart" not in migrate  # a one-shot job
    assert mlflow["depends_on"]["mlflow-migrate"] == {
        "condition": "service_completed_successfully"
    }


def test_api_listens_on_8000_and_waits_for_a_healthy_redis(compose: dict) -> None:
    api = compose["services"]["api"]
    assert "8000:8000" in api["ports"]
    assert api["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert "/healthz" in " ".join(api["healthcheck"]["test"])


def test_services_reach_redis_and_mlflow_by_service_name(compose: dict) -> None:
    services = compose["services"]
    for name in ("api", "worker", "worker-gpu"):
        env = services[name]["environment"]
        redis = urlsplit(env["LLM_REDIS_URL"])
        assert redis.hostname in services and redis.hostname == "redis" and redis.port == 6379
        mlflow = urlsplit(env["MLFLOW_TRACKING_URI"])
        assert mlflow.hostname == "mlflow" and mlflow.port == 5000
    trainer = urlsplit(services["trainer"]["environment"]["MLFLOW_TRACKING_URI"])
    assert (trainer.hostname, trainer.port) == ("mlflow", 5000)


def test_gpu_worker_is_a_profile_with_a_gpu_reservation(compose: dict) -> None:
    gpu = compose["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["LLM_DEVICE"] == "cuda"
    assert compose["services"]["worker"]["environment"]["LLM_DEVICE"] == "cpu"
    assert "profiles" not in compose["services"]["worker"]


@pytest.mark.parametrize(("env", "cpu_workers"), [({}, 1), ({"LLM_CPU_WORKERS": "0"}, 0)])
def test_the_gpu_worker_can_replace_the_cpu_worker(
    docker_compose: str, env: dict[str, str], cpu_workers: int
) -> None:
    # Both workers consume llm:jobs: with --profile gpu the CPU worker took half the jobs and ran
    # them many times slower. `docker compose up` alone still runs one CPU worker.
    proc = subprocess.run(
        [docker_compose, "--project-directory", str(REPO), "-f", str(COMPOSE), "--profile", "gpu",
         "config"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**{k: v for k, v in os.environ.items() if k != "LLM_CPU_WORKERS"}, **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    assert services["worker"].get("scale", 1) == cpu_workers
    assert services["worker-gpu"].get("scale", 1) == 1


def _duration_s(value: str) -> float:
    """A compose duration ("11m", "1m30s", "90s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def test_compose_worker_stop_grace_exceeds_the_job_time_limit(compose: dict) -> None:
    # A job taken just before SIGTERM may run until its deadline (the time limit after it was
    # submitted); then it is recorded, acked, and runtime.stop joins threads (up to 30 s). A
    # SIGKILL at exactly the time limit left the record running and the job ran again later.
    assert _duration_s("1m30s") == 90
    default_limit = Settings.model_fields["job_time_limit_s"].default
    for name in ("worker", "worker-gpu"):
        service = compose["services"][name]
        limit = service["environment"].get("LLM_JOB_TIME_LIMIT_S", default_limit)
        grace = _duration_s(service["stop_grace_period"])
        assert grace >= float(limit) + 60, (name, service["stop_grace_period"], limit)


def test_trainer_is_a_one_shot_profile_that_registers_a_model(compose: dict) -> None:
    trainer = compose["services"]["trainer"]
    assert trainer["profiles"] == ["train"]
    assert trainer["restart"] == "no"
    cmd = trainer["command"]
    assert cmd[0] == "torchrun" and cmd[cmd.index("-m") + 1] == "services.trainer"
    assert "tracking.register_name=llm" in cmd
    assert trainer["depends_on"]["mlflow"] == {"condition": "service_healthy"}


def test_every_built_service_names_a_dockerfile_target(compose: dict) -> None:
    stages = parse_dockerfile(REPO / "Dockerfile").stages
    for name, service in compose["services"].items():
        if "build" in service:
            assert service["build"]["target"] in stages, name
            assert (REPO / service["build"].get("context", ".")).resolve() == REPO
