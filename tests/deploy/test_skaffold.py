"""skaffold.yaml validated offline: its own schema version, Dockerfile targets, Helm values it
sets, the port-forward and file sync, and the chart rendered exactly as skaffold would."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import CHART, NAMESPACE, RELEASE, REPO, helm_template, schema_path
from tests.deploy.entrypoints import parse_dockerfile

pytestmark = pytest.mark.deploy

SKAFFOLD = REPO / "skaffold.yaml"
_TEMPLATE = re.compile(r"\{\{\s*\.IMAGE_(REPO|TAG)_(\w+)\s*\}\}")


@pytest.fixture(scope="module")
def skaffold() -> dict:
    return yaml.safe_load(SKAFFOLD.read_text())


def configs(skaffold: dict) -> dict[str, tuple[dict, dict]]:
    """{profile or "base": (build, deploy)}, as skaffold resolves them (a profile replaces)."""
    out = {"base": (skaffold["build"], skaffold["deploy"])}
    for profile in skaffold["profiles"]:
        out[profile["name"]] = (
            profile.get("build", skaffold["build"]),
            profile.get("deploy", skaffold["deploy"]),
        )
    return out


def test_skaffold_api_version_is_v4beta13_or_newer(skaffold: dict) -> None:
    m = re.fullmatch(r"skaffold/v(\d+)beta(\d+)", skaffold["apiVersion"])
    assert m and (int(m[1]), int(m[2])) >= (4, 13), skaffold["apiVersion"]
    assert skaffold["kind"] == "Config"


def test_skaffold_yaml_matches_the_skaffold_schema(skaffold: dict) -> None:
    version = skaffold["apiVersion"].split("/")[1]
    schema = json.loads(schema_path(f"skaffold-{version}.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(skaffold)]
    assert errors == []
    broken = yaml.safe_load(yaml.safe_dump(skaffold))
    broken["build"]["artifacts"][0]["docker"]["targett"] = "api"
    assert list(validator.iter_errors(broken)), "the schema check must reject unknown keys"


def test_profiles_cpu_and_gpu_exist(skaffold: dict) -> None:
    assert {p["name"] for p in skaffold["profiles"]} >= {"cpu", "gpu"}
    build, _ = configs(skaffold)["gpu"]
    assert {a["docker"]["target"] for a in build["artifacts"]} >= {"api", "worker-gpu"}
    build, deploy = configs(skaffold)["train"]
    assert "trainer" in {a["docker"]["target"] for a in build["artifacts"]}
    assert _release(deploy)["setValues"]["training.enabled"] == "true"
    build, _ = configs(skaffold)["cpu"]
    assert not any("gpu" in a["docker"]["target"] for a in build["artifacts"])


@pytest.mark.parametrize("profile", ["gpu", "train"], ids=lambda p: f"profile-{p}")
def test_remote_cluster_profiles_let_skaffold_push_the_images(skaffold: dict, profile: str) -> None:
    # GPU clusters are remote: `push: false` kept the images on the laptop, and every pod was
    # ErrImagePull. Unset, skaffold pushes for remote contexts and loads into local ones.
    build, _ = configs(skaffold)[profile]
    assert build.get("local", {}).get("push") is not False


def test_every_artifact_builds_a_dockerfile_target(skaffold: dict) -> None:
    stages = parse_dockerfile(REPO / "Dockerfile").stages
    for name, (build, _) in configs(skaffold).items():
        images = [a["image"] for a in build["artifacts"]]
        assert len(images) == len(set(images)), name
        for artifact in build["artifacts"]:
            docker = artifact["docker"]
            assert (
                REPO / artifact.get("context", ".") / docker.get("dockerfile", "Dockerfile")
            ).is_file()
            assert docker["target"] in stages, f"{name}: {docker['target']}"


def test_file_sync_reaches_the_reloading_api_and_workers_are_rebuilt(skaffold: dict) -> None:
    for name, (build, _) in configs(skaffold).items():
        by_target = {a["docker"]["target"]: a for a in build["artifacts"]}
        rules = by_target["api"]["sync"]["manual"]
        assert {"src": "services/**/*.py", "dest": "/app"} in rules, name
        # Celery never reloads, and a restarted pod starts from the image: a synced worker file
        # would change nothing. Without sync rules skaffold rebuilds and redeploys the worker.
        for target in ("worker", "worker-gpu"):
            if target in by_target:
                assert "sync" not in by_target[target], f"{name}: {target}"


def _release(deploy: dict) -> dict:
    (release,) = deploy["helm"]["releases"]
    return release


@pytest.mark.parametrize("profile", ["base", "cpu", "gpu", "train"], ids=lambda p: f"profile-{p}")
def test_helm_release_renders_with_the_built_images(
    skaffold: dict, helm: str, profile: str
) -> None:
    build, deploy = configs(skaffold)[profile]
    release = _release(deploy)
    assert (REPO / release["chartPath"]).resolve() == CHART
    assert (release["name"], release["namespace"]) == (RELEASE, NAMESPACE)
    built = {a["image"].replace("-", "_").replace("/", "_"): a["image"] for a in build["artifacts"]}
    sets = []
    fake = {}
    for key, template in release["setValueTemplates"].items():
        m = _TEMPLATE.fullmatch(template)
        assert m, f"{key}: {template}"
        assert m[2] in built, f"{key} uses {m[2]}, which this profile does not build"
        # skaffold --default-repo=localhost:5000 (a local registry) gives host:port/image.
        value = f"localhost:5000/{built[m[2]]}" if m[1] == "REPO" else "dev-1234"
        fake[key] = value
        sets.append(f"{key}={value}")
    sets += [f"{k}={v}" for k, v in release.get("setValues", {}).items()]
    rendered = helm_template(helm, [REPO / f for f in release["valuesFiles"]], sets)
    images = {c["image"] for _, pod in rendered.workloads() for c in pod["containers"]}
    # Every image skaffold builds and sets is the one the chart runs.
    for key, value in fake.items():
        if key.endswith(".repository"):
            assert f"{value}:dev-1234" in images, f"{value} not deployed"
    # Sync needs a writable /app; uvicorn reloads the synced code.
    api = rendered.get("Deployment", f"{RELEASE}-api")["spec"]["template"]["spec"]["containers"][0]
    assert "--reload" in api["args"]
    assert api["securityContext"]["readOnlyRootFilesystem"] is False


def test_port_forward_reaches_the_api_service(skaffold: dict, render) -> None:
    rendered = render(values=(CHART / "ci" / "cpu-values.yaml",))
    forwards = {(f["resourceName"], f["port"]) for f in skaffold["portForward"]}
    svc = rendered.get("Service", f"{RELEASE}-api")
    assert (svc["metadata"]["name"], svc["spec"]["ports"][0]["port"]) in forwards
    assert all(
        f["namespace"] == NAMESPACE and f["resourceType"] == "service"
        for f in skaffold["portForward"]
    )
