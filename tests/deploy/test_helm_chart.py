"""charts/llm rendered offline for every supported shape: lint, Kubernetes schemas, and the
promises the chart makes (probes, GPUs, non-root, URLs that reach the right Services)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.common import keys
from services.common.settings import Settings
from services.stack import STREAM_NODE_MAX_BYTES
from tests.deploy.conftest import (
    CHART,
    CI_VALUES,
    KUBE_VERSIONS,
    MIN_KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    REPO,
    SHAPES,
    VENV_BIN,
    Rendered,
    RenderError,
    containers,
    env_of,
    helm_template,
)
from tests.deploy.master_password import derive_password

pytestmark = pytest.mark.deploy

# Custom resources kubernetes-validate has no schema for, and where each one is checked instead.
CUSTOM_KINDS = {
    "PyTorchJob": "test_pytorchjob.py (kubeflow SDK models and the CRD schema)",
    "ScaledObject": "test_keda_scales_the_worker_on_the_redis_queue",
    "TriggerAuthentication": "test_keda_scales_the_worker_on_the_redis_queue",
}
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/version",
    "helm.sh/chart",
)


def component(name: str) -> str:
    return f"{RELEASE}-{name}"


def container(rendered: Rendered, kind: str, name: str, container_name: str | None = None) -> dict:
    spec = rendered.get(kind, name)["spec"]["template"]["spec"]
    found = containers(spec)
    if container_name is None:
        return spec["containers"][0]  # the main container, not an init container
    return next(c for c in found if c["name"] == container_name)


# --- lint and schemas


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_chart_passes_helm_lint_strict(helm: str, values: Path | None) -> None:
    cmd = [
        helm,
        "lint",
        "--strict",
        str(CHART),
        "--kube-version",
        MIN_KUBE_VERSION,
        "--namespace",
        NAMESPACE,
    ]
    if values is not None:
        cmd += ["--values", str(values)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_ci_values_cover_every_supported_shape() -> None:
    assert {p.name for p in CI_VALUES} >= {
        "cpu-values.yaml",
        "gpu-values.yaml",
        "external-values.yaml",
        "training-values.yaml",
        "keda-values.yaml",
    }


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_rendered_object_passes_kubernetes_validate_strict(
    shapes: dict[str, Rendered], shape: str, kube_version: str
) -> None:
    rendered = shapes[shape]
    assert rendered.objects, "nothing rendered"
    failures = []
    for obj in rendered.objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            failures.append(f"{where}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            if obj["kind"] not in CUSTOM_KINDS:
                failures.append(
                    f"{where}: no Kubernetes {kube_version} schema for "
                    f"{obj['apiVersion']} {obj['kind']}"
                )
    assert not failures, "\n".join(failures)


def test_values_yaml_passes_its_own_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(values)


BAD_VALUES = {
    "unknown top-level key": "replicas=3",
    "typo inside a section": "api.replicaCnt=3",
    "negative replica count": "worker.replicaCount=-1",
    "unknown Service type": "api.service.type=Public",
    "HPA and KEDA on the worker": "worker.autoscaling.enabled=true,worker.keda.enabled=true",
    "password that breaks the redis:// URL": "redis.auth.password=p@ss/word",
    "redis off without a URL": "redis.enabled=false",
    "mlflow off without a URI": "mlflow.enabled=false",
    "not a URL for external redis": "redis.enabled=false,redis.external.url=localhost:6379",
    "bad cleanPodPolicy": "training.runPolicy.cleanPodPolicy=Sometimes",
    "zero processes per node": "training.nprocPerNode=0",
    "container running as root": "containerSecurityContext.runAsNonRoot=false",
    "bad storage size": "redis.persistence.size=lots",
    "resources without limits": "api.resources.limits=null",
    "redis maxmemory Redis cannot parse": "redis.maxmemory=lots",
    "negative stream node size": "redis.streamNodeMaxBytes=-1",
    "stream node size with a unit": "redis.streamNodeMaxBytes=4kb",
    "GPUs a worker's single engine leaves idle": "worker.gpu.enabled=true,worker.gpu.count=2",
}


@pytest.mark.parametrize("bad", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_values_schema_rejects_bad_values(render, bad: str) -> None:
    with pytest.raises(RenderError, match="schema|exclusive|set redis|set mlflow"):
        render(sets=(bad,))


def test_values_schema_accepts_the_good_neighbours_of_bad_values(render) -> None:
    # The same keys with good values render: the rejections above are about the values.
    render(
        sets=(
            "worker.replicaCount=0",
            "api.service.type=NodePort",
            "worker.keda.enabled=true",
            "redis.auth.password=A-z0-9._~",
        )
    )


def test_large_job_ttl_renders_as_plain_integer(render, tmp_path: Path) -> None:
    # Numbers in a values file reach templates as floats, which `quote` printed as 1.2096e+06:
    # Settings refuse that as an integer and every API and worker pod crash-looped.
    values = tmp_path / "big-values.yaml"
    values.write_text("settings:\n  jobTtlS: 1209600\n  maxNewTokens: 1000000\n"
                      "  maxBatch: 1000000\n")  # fmt: skip
    rendered = render(values=(values,))
    for name in ("api", "worker"):
        env = env_of(container(rendered, "Deployment", component(name)))
        got = {key: env[key]["value"] for key in ("LLM_JOB_TTL_S", "LLM_MAX_NEW_TOKENS",
                                                  "LLM_MAX_BATCH")}  # fmt: skip
        assert got == {"LLM_JOB_TTL_S": "1209600", "LLM_MAX_NEW_TOKENS": "1000000",
                       "LLM_MAX_BATCH": "1000000"}  # fmt: skip
        settings = Settings(job_ttl_s=got["LLM_JOB_TTL_S"],
                            max_new_tokens=got["LLM_MAX_NEW_TOKENS"],
                            max_batch=got["LLM_MAX_BATCH"])  # fmt: skip
        assert settings.job_ttl_s == 1209600
    worker = container(rendered, "Deployment", component("worker"))
    argv = worker["command"] + worker["args"]
    assert argv[argv.index("--concurrency") + 1] == "2000000"  # 2 x maxBatch


@pytest.mark.parametrize("ttl", [60, 300, 600, 3600, 4200])
def test_schema_refuses_job_ttl_at_or_below_visibility_timeout_and_time_limit(
    render, ttl: int
) -> None:
    # Settings refuse job_ttl_s <= visibility_timeout_s + job_time_limit_s (3600 + 600 unless
    # extraEnv sets them): the chart said it refuses bad values at install time, and such pods
    # crash-looped instead.
    with pytest.raises(RenderError, match="jobTtlS"):
        render(sets=(f"settings.jobTtlS={ttl}",))
    render(sets=("settings.jobTtlS=4201",))
    Settings(job_ttl_s=4201)


def test_chart_refuses_job_ttl_below_the_timeouts_extra_env_sets(render) -> None:
    sets = ("settings.jobTtlS=7000", "settings.extraEnv[0].name=LLM_VISIBILITY_TIMEOUT_S")
    with pytest.raises(RenderError, match=r"jobTtlS \(7000\) must exceed .*7200 \+ 600"):
        render(sets=(*sets, "settings.extraEnv[0].value=7200"))
    with pytest.raises(RenderError, match=r"6000 \+ 1200"):
        render(sets=(*sets, "settings.extraEnv[0].value=6000",
                     "settings.extraEnv[1].name=LLM_JOB_TIME_LIMIT_S",
                     "settings.extraEnv[1].value=1200"))  # fmt: skip
    render(sets=(*sets, "settings.extraEnv[0].value=6000"))


def test_chart_refuses_worker_grace_period_below_the_job_time_limit_extra_env_sets(render) -> None:
    # A job taken just before SIGTERM may run for the whole time limit, then be recorded and
    # acked: a SIGKILL at 900 s with a 1200 s limit left the record running until the
    # visibility timeout, and the job ran again from the start.
    sets = ("settings.jobTtlS=86400", "settings.extraEnv[0].name=LLM_JOB_TIME_LIMIT_S",
            "settings.extraEnv[0].value=1200")  # fmt: skip
    with pytest.raises(RenderError, match=r"worker.terminationGracePeriodSeconds \(900\) must be "
                       r"at least LLM_JOB_TIME_LIMIT_S \+ 60 \(1200 \+ 60\).*1260 or more"):
        render(sets=sets)
    with pytest.raises(RenderError, match=r"terminationGracePeriodSeconds \(1259\)"):
        render(sets=(*sets, "worker.terminationGracePeriodSeconds=1259"))
    worker = render(sets=(*sets, "worker.terminationGracePeriodSeconds=1260"))
    pod = worker.get("Deployment", component("worker"))["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 1260
    # The default time limit (600 s) needs 660 s; without a worker there is nothing to check.
    assert Settings().job_time_limit_s == 600
    with pytest.raises(RenderError, match=r"\(659\) must be at least .*\(600 \+ 60\)"):
        render(sets=("worker.terminationGracePeriodSeconds=659",))
    render(sets=("worker.terminationGracePeriodSeconds=660",))
    render(sets=("worker.enabled=false", "worker.terminationGracePeriodSeconds=60"))


# --- every object


@pytest.mark.parametrize("shape", SHAPES)
def test_every_object_has_the_standard_labels(shapes: dict[str, Rendered], shape: str) -> None:
    for obj in shapes[shape].objects:
        labels = obj["metadata"].get("labels") or {}
        missing = [k for k in STANDARD_LABELS if k not in labels]
        if obj["kind"] == "Namespace":
            continue
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/name"] == "llm"


@pytest.mark.parametrize("shape", SHAPES)
def test_every_container_has_resources_and_runs_as_non_root(
    shapes: dict[str, Rendered], shape: str
) -> None:
    workloads = shapes[shape].workloads()
    assert workloads
    for obj, pod in workloads:
        pod_sc = pod.get("securityContext") or {}
        mounts_tmp_volume = {v["name"] for v in pod.get("volumes") or [] if "emptyDir" in v}
        for c in containers(pod):
            where = f"{obj['kind']}/{obj['metadata']['name']}:{c['name']}"
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part) or {}), f"{where}: {part} {res}"
            sc = c.get("securityContext") or {}
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert (sc.get("runAsUser") or pod_sc.get("runAsUser") or 0) > 0, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert sc.get("readOnlyRootFilesystem") is True, where
            tmp = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in mounts_tmp_volume, f"{where}: no writable /tmp"


@pytest.mark.parametrize("shape", SHAPES)
def test_every_pod_uses_the_release_service_account(
    shapes: dict[str, Rendered], shape: str
) -> None:
    rendered = shapes[shape]
    accounts = rendered.names("ServiceAccount")
    for obj, pod in rendered.workloads():
        assert pod.get("serviceAccountName") in accounts, obj["metadata"]["name"]
        assert pod.get("automountServiceAccountToken") is False


@pytest.mark.parametrize("shape", SHAPES)
def test_services_and_controllers_select_their_own_pods(
    shapes: dict[str, Rendered], shape: str
) -> None:
    rendered = shapes[shape]
    pod_labels = []
    for obj in rendered.objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
            pod_labels.append((obj["metadata"]["name"], labels))
    for svc in rendered.of_kind("Service"):
        selector = svc["spec"]["selector"]
        matched = [name for name, labels in pod_labels if selector.items() <= labels.items()]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {matched}"


# --- API


@pytest.mark.parametrize("shape", SHAPES)
def test_api_readiness_does_not_hang_on_workers_or_redis(
    shapes: dict[str, Rendered], shape: str
) -> None:
    api = container(shapes[shape], "Deployment", component("api"))
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # /readyz fails without a worker: an API ready on it would leave a fresh install (no model
    # yet) with no endpoints at all.
    assert api["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in api["ports"]
    assert api["command"] + api["args"][:6] == [
        "uvicorn",
        "services.api.app:create_app",
        "--factory",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]


@pytest.mark.parametrize("shape", SHAPES)
def test_api_drains_before_it_stops(shapes: dict[str, Rendered], shape: str) -> None:
    # Without a preStop pause a terminating pod is still in the Service's endpoints (and the
    # ingress controller's upstreams) for a moment after SIGTERM: requests get connection
    # refused. uvicorn must then finish open requests before the kubelet's SIGKILL.
    pod = shapes[shape].get("Deployment", component("api"))["spec"]["template"]["spec"]
    api = pod["containers"][0]
    command = api["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and 5 <= int(command[1]) <= 10
    args = api["args"]
    graceful = int(args[args.index("--timeout-graceful-shutdown") + 1])
    assert 0 < int(command[1]) + graceful < pod["terminationGracePeriodSeconds"]


def test_chart_refuses_an_api_prestop_that_leaves_no_time_to_drain(render) -> None:
    # The kubelet kills the pod when the grace period ends, preStop included: grace 10 with a
    # 30 s preStop rendered --timeout-graceful-shutdown "1" (a clamped -25), and uvicorn never
    # got SIGTERM, so every open request and event stream was cut.
    for grace, pre_stop in ((10, 30), (10, 5), (35, 30)):
        with pytest.raises(
            RenderError,
            match=rf"api.terminationGracePeriodSeconds \({grace}\) must be at least "
            rf"api.preStopSleepSeconds \+ 6 \({pre_stop} \+ 6\).*to {pre_stop + 6} or more",
        ):
            render(sets=(f"api.terminationGracePeriodSeconds={grace}",
                         f"api.preStopSleepSeconds={pre_stop}"))  # fmt: skip
    for grace, pre_stop, drain in ((36, 30, 1), (10, 0, 5), (30, 5, 20)):
        rendered = render(sets=(f"api.terminationGracePeriodSeconds={grace}",
                                f"api.preStopSleepSeconds={pre_stop}"))  # fmt: skip
        args = container(rendered, "Deployment", component("api"))["args"]
        assert args[args.index("--timeout-graceful-shutdown") + 1] == str(drain)


def test_api_ingress_hpa_and_pdb_target_the_api(shapes: dict[str, Rendered]) -> None:
    rendered = shapes["gpu-values"]  # ingress, HPA and PDB all on
    name = component("api")
    ingress = rendered.get("Ingress", name)
    backends = [
        p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]
    ]
    assert backends == [{"name": name, "port": {"name": "http"}}]
    hpa = rendered.get("HorizontalPodAutoscaler", name)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name,
    }
    # With an HPA the Deployment leaves replicas to it.
    assert "replicas" not in rendered.get("Deployment", name)["spec"]
    pdb = rendered.get("PodDisruptionBudget", name)
    pod_labels = rendered.get("Deployment", name)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("tag", "image"),
    [
        ("1.2.3", "llm-api:1.2.3"),
        (f"@{DIGEST}", f"llm-api@{DIGEST}"),  # a bare digest: no ':' before the '@'
        (f"1.2.3@{DIGEST}", f"llm-api:1.2.3@{DIGEST}"),
    ],
)
def test_image_tags_and_digests_make_valid_references(render, tag: str, image: str) -> None:
    rendered = render(sets=(f"images.api.tag={tag}",))
    assert container(rendered, "Deployment", component("api"))["image"] == image


def test_api_disruption_budget_never_blocks_a_node_drain(render) -> None:
    # minAvailable: 1 with one replica forbids every eviction: `kubectl drain` hangs on it.
    for sets in ((), ("api.replicaCount=1",)):
        pdb = render(sets=sets).get("PodDisruptionBudget", component("api"))["spec"]
        assert pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb, sets
    with pytest.raises(RenderError, match="minAvailable"):
        render(sets=("api.replicaCount=1", "api.podDisruptionBudget.minAvailable=1"))
    pdb = render(sets=("api.replicaCount=3", "api.podDisruptionBudget.minAvailable=2"))
    assert pdb.get("PodDisruptionBudget", component("api"))["spec"]["minAvailable"] == 2


def test_api_keys_come_from_a_secret(shapes: dict[str, Rendered]) -> None:
    rendered = shapes["cpu-values"]
    secret = rendered.get("Secret", component("api-keys"))
    assert secret["stringData"]["LLM_API_KEYS"] == "ci-key-1,ci-key-2"
    api = env_of(container(rendered, "Deployment", component("api")))
    ref = api["LLM_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": component("api-keys"), "key": "LLM_API_KEYS"}
    # The workers never read the keys (test_chart_day2.py).
    assert "LLM_API_KEYS" not in env_of(container(rendered, "Deployment", component("worker")))
    # An existing Secret is used as is, and none is created.
    external = shapes["external-values"]
    assert component("api-keys") not in external.names("Secret")
    ref = env_of(container(external, "Deployment", component("api")))["LLM_API_KEYS"]
    assert ref["valueFrom"]["secretKeyRef"]["name"] == "llm-api-keys"


def test_a_public_ingress_needs_api_keys(render: Callable[..., Rendered]) -> None:
    # LLM_API_KEYS empty means an open API: behind an ingress anyone could submit jobs.
    with pytest.raises(RenderError, match="api.ingress.enabled without API keys"):
        render(sets=("api.ingress.enabled=true",))
    for ok in (
        ("apiKeys.existingSecret=llm-api-keys",),
        ("apiKeys.keys={key-aaaaaaaa}",),
        ("settings.extraEnv[0].name=LLM_API_KEYS", "settings.extraEnv[0].value=key-aaaaaaaa"),
        ("api.ingress.allowAnonymous=true",),
    ):
        assert render(sets=("api.ingress.enabled=true", *ok)).of_kind("Ingress"), ok


def test_the_gpu_shape_serves_its_ingress_with_api_keys(shapes: dict[str, Rendered]) -> None:
    rendered = shapes["gpu-values"]
    assert rendered.of_kind("Ingress")
    env = env_of(container(rendered, "Deployment", component("api")))
    assert env["LLM_API_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "LLM_API_KEYS"


# --- worker


@pytest.mark.parametrize("shape", ["gpu-values", "training-values"])
def test_gpu_worker_requests_nvidia_gpus_on_gpu_nodes(
    shapes: dict[str, Rendered], shape: str
) -> None:
    rendered = shapes[shape]
    deployment = rendered.get("Deployment", component("worker"))
    pod = deployment["spec"]["template"]["spec"]
    worker = containers(pod)[0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["image"].startswith("llm-worker-gpu:")
    assert env_of(worker)["LLM_DEVICE"]["value"] == "cuda"
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in worker["volumeMounts"]


def test_gpu_workers_roll_out_without_asking_for_a_spare_gpu(shapes: dict[str, Rendered]) -> None:
    gpu = shapes["gpu-values"].get("Deployment", component("worker"))["spec"]["strategy"]
    assert gpu == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    cpu = shapes["defaults"].get("Deployment", component("worker"))["spec"]
    assert "strategy" not in cpu  # CPU workers surge as usual


def test_cpu_worker_asks_for_no_gpu(shapes: dict[str, Rendered]) -> None:
    for shape in ("defaults", "cpu-values"):
        deployment = shapes[shape].get("Deployment", component("worker"))
        pod = deployment["spec"]["template"]["spec"]
        worker = containers(pod)[0]
        assert "nvidia.com/gpu" not in worker["resources"]["limits"]
        assert "runtimeClassName" not in pod
        assert worker["image"].startswith("llm-worker:")
        assert env_of(worker)["LLM_DEVICE"]["value"] == "cpu"


@pytest.mark.parametrize("shape", SHAPES)
def test_worker_runs_celery_threads_ready_on_heartbeat_and_drains_on_stop(
    shapes: dict[str, Rendered], shape: str
) -> None:
    deployment = shapes[shape].get("Deployment", component("worker"))
    pod = deployment["spec"]["template"]["spec"]
    worker = containers(pod)[0]
    argv = worker["command"] + worker["args"]
    assert argv[:4] == ["celery", "-A", "services.worker.celery_app:app", "worker"]
    assert argv[argv.index("--pool") + 1] == "threads"
    # Each thread waits on one job: fewer threads than engine slots leave slots empty.
    max_batch = int(env_of(worker)["LLM_MAX_BATCH"]["value"])
    assert int(argv[argv.index("--concurrency") + 1]) >= max_batch
    assert worker["readinessProbe"]["exec"]["command"] == [
        "python",
        "-m",
        "services.worker.healthcheck",
    ]
    # Longer than the longest job (LLM_JOB_TIME_LIMIT_S defaults to 600 s).
    assert pod["terminationGracePeriodSeconds"] > 600
    # Downloaded models go to their own writable volume (the root filesystem is read-only).
    cache = env_of(worker)["LLM_MODEL_CACHE_DIR"]["value"]
    assert cache in [m["mountPath"] for m in worker["volumeMounts"]]


@pytest.mark.parametrize("shape", SHAPES)
def test_a_worker_whose_engine_stalls_or_stops_beating_is_restarted_once_it_has_started(
    shapes: dict[str, Rendered], shape: str
) -> None:
    # A hung GPU or a deadlock left the worker ready and alive forever: no liveness probe, and
    # the probe only read the heartbeat, which kept beating.
    deployment = shapes[shape].get("Deployment", component("worker"))
    pod = deployment["spec"]["template"]["spec"]
    worker = containers(pod)[0]
    probe = ["python", "-m", "services.worker.healthcheck"]
    startup, live = worker["startupProbe"], worker["livenessProbe"]
    assert startup["exec"]["command"] == probe
    assert live["exec"]["command"] == [*probe, "--live"]  # a Redis outage restarts no worker
    # The heartbeat starts after the model's download, load and GPU compile: minutes.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200
    # Liveness fails on the bound the worker acts on itself (LLM_ENGINE_STALL_S, read by the
    # probe), and only after the heartbeat has had time to expire (3 beats), not on one miss.
    stall = env_of(worker)["LLM_ENGINE_STALL_S"]["value"]
    assert Settings(engine_stall_s=stall).engine_stall_s == 300
    assert live["periodSeconds"] * live["failureThreshold"] > Settings().heartbeat_ttl_s
    # A wedged worker is not given the warm shutdown's grace (time for a job to finish).
    assert live["terminationGracePeriodSeconds"] < pod["terminationGracePeriodSeconds"]


def test_the_engine_stall_bound_renders_for_the_worker_and_is_checked_at_install(
    render,
) -> None:
    worker = container(render(sets=("settings.engineStallS=900",)), "Deployment",
                       component("worker"))  # fmt: skip
    assert env_of(worker)["LLM_ENGINE_STALL_S"]["value"] == "900"
    with pytest.raises(RenderError, match="engineStallS"):
        render(sets=("settings.engineStallS=0",))  # Settings refuse it: pods would crash-loop


@pytest.mark.parametrize("shape", ["defaults", "cpu-values", "gpu-values"])
def test_worker_torch_threads_follow_the_cpu_limit_not_the_node(
    shapes: dict[str, Rendered], shape: str
) -> None:
    # torch sizes its thread pool from the node's cores: 2 CPUs of quota on a 64-core node
    # would run 64 threads and spend the quota being throttled.
    worker = container(shapes[shape], "Deployment", component("worker"))
    assert env_of(worker)["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"] == {
        "containerName": "worker",
        "resource": "limits.cpu",
        "divisor": "1",
    }


def test_worker_without_a_cpu_limit_leaves_torch_threads_alone(render) -> None:
    # Without a limit, limits.cpu reads as the node's allocatable CPUs: no better than torch's own.
    worker = container(
        render(sets=("worker.resources.limits.cpu=null",)), "Deployment", component("worker")
    )
    assert "OMP_NUM_THREADS" not in env_of(worker)
    own = ("settings.extraEnv[0].name=OMP_NUM_THREADS", "settings.extraEnv[0].value=3")
    env = env_of(container(render(sets=own), "Deployment", component("worker")))
    assert "valueFrom" not in env["OMP_NUM_THREADS"]  # the user's own setting, not a duplicate


OLD_SECRETS = ("apiKeys.keys={key-aaaaaaaa}", "redis.auth.password=pw-aaaaaaaaaaaa")


SECRET_READERS = (
    ("Deployment", "api"), ("Deployment", "worker"), ("StatefulSet", "redis"),
    ("Deployment", "mlflow"),
)  # fmt: skip


def _secrets_checksums(rendered: Rendered) -> dict[str, str]:
    return {
        name: rendered.get(kind, component(name))["spec"]["template"]["metadata"]["annotations"][
            "checksum/secrets"
        ]
        for kind, name in SECRET_READERS
    }


@pytest.mark.parametrize(
    ("changed", "rolled"),
    [
        # Only the API reads the keys: a rotation drained every GPU worker for nothing.
        ("apiKeys.keys={key-bbbbbbbb}", {"api"}),
        ("apiKeys.existingSecret=corp-keys", {"api"}),
        ("redis.auth.password=pw-bbbbbbbb", {"api", "worker", "redis"}),
        # A new database password: MLflow kept the old one until something restarted it.
        ("mlflow.backend.postgres.url=postgresql://mlflow:new@db:5432/mlflow", {"mlflow"}),
        ("mlflow.backend.postgres.existingSecret=corp-mlflow-db", {"mlflow"}),
        ("mlflow.backend.postgres.existingSecretKey=url", {"mlflow"}),
    ],
)
def test_a_changed_secret_rolls_the_pods_that_read_it_at_start(
    render: Callable[..., Rendered], changed: str, rolled: set[str]
) -> None:
    # Keys and the Redis password reach the containers as env at start (and Redis's own
    # --requirepass): pods that keep running would keep the old ones, and a later partial
    # roll would pair a new client password with the old server one.
    before = _secrets_checksums(render(sets=OLD_SECRETS))
    after = _secrets_checksums(render(sets=(*OLD_SECRETS, changed)))
    assert {name for name in before if before[name] != after[name]} == rolled


def test_the_secrets_checksum_is_a_scrypt_of_the_secrets_salted_by_the_release(
    render: Callable[..., Rendered],
) -> None:
    """The annotation is readable by anyone who may read pods: it was a plain sha256 of the
    values holding keys and passwords, which a dictionary of short ones inverts offline. It is
    recomputed here from the MLflow pod's one input, the database URL."""
    postgres = {"existingSecret": "", "existingSecretKey": "postgres-url",
                "url": "postgresql://mlflow:pw-aaaaaaaa@db:5432/mlflow"}  # fmt: skip
    rendered = render(sets=(f"mlflow.backend.postgres.url={postgres['url']}",))
    annotations = rendered.get("Deployment", component("mlflow"))["spec"]["template"]["metadata"][
        "annotations"]  # fmt: skip
    inputs = json.dumps({"mlflowBackend": postgres}, sort_keys=True, separators=(",", ":"))
    derived = derive_password(1, inputs, NAMESPACE, f"{RELEASE}/checksum-secrets")
    assert annotations["checksum/secrets"] == hashlib.sha256(derived.encode()).hexdigest()


def test_an_unchanged_release_never_rolls_its_pods_for_a_generated_password(helm: str) -> None:
    # The generated Redis password is random in each render (the cluster keeps its copy through
    # lookup): hashing a render of secrets.yaml gave every upgrade new checksums, and the first
    # no-op `helm upgrade` restarted the API, the workers and Redis.
    first, second = (_secrets_checksums(helm_template(helm)) for _ in range(2))
    assert first == second


def test_keda_scales_the_worker_on_the_redis_queue(shapes: dict[str, Rendered]) -> None:
    rendered = shapes["keda-values"]
    name = component("worker")
    scaled = rendered.get("ScaledObject", name)
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name,
    }
    assert 0 < scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata must be strings"
    redis_svc = rendered.get("Service", component("redis"))
    assert (
        meta["address"]
        == f"{component('redis')}.{NAMESPACE}.svc:{redis_svc['spec']['ports'][0]['port']}"
    )
    assert meta["listName"] == keys.QUEUE, "KEDA must watch the list the API pushes jobs to"
    auth = rendered.get("TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    secret = rendered.get("Secret", ref["name"])
    assert ref["parameter"] == "password" and ref["key"] in secret["data"]
    # KEDA owns the worker's HPA: the chart must not add its own.
    assert "replicas" not in rendered.get("Deployment", name)["spec"]


def test_keda_reads_an_external_redis_from_its_url(render) -> None:
    rendered = render(
        values=(CHART / "ci" / "external-values.yaml",), sets=("worker.keda.enabled=true",)
    )
    meta = rendered.get("ScaledObject", component("worker"))["spec"]["triggers"][0]["metadata"]
    assert meta["address"] == "redis.data.svc.cluster.local:6379"
    assert meta["databaseIndex"] == "1"
    secret = rendered.get("Secret", component("worker-keda-redis"))
    assert secret["stringData"] == {"redis-password": "external-password"}


@pytest.mark.parametrize(
    ("userinfo", "user", "password"),
    [("app:s3cret", "app", "s3cret"), ("admin", "admin", ""), (":pw", None, "pw")],
)
def test_keda_gets_an_external_redis_user_and_password_as_the_url_means_them(
    render: Callable[..., Rendered], userinfo: str, user: str | None, password: str
) -> None:
    # "admin@" is a user name, not a password; "user:password" gives both.
    rendered = render(sets=("redis.enabled=false", "worker.keda.enabled=true",
                            f"redis.external.url=redis://{userinfo}@ext-redis:6380/2"))  # fmt: skip
    secret = rendered.get("Secret", component("worker-keda-redis"))["stringData"]
    assert secret["redis-password"] == password and secret.get("redis-username") == user
    auth = rendered.get("TriggerAuthentication", component("worker-redis"))["spec"]
    assert ("username" in [r["parameter"] for r in auth["secretTargetRef"]]) == (user is not None)


def test_keda_refuses_an_external_redis_password_it_cannot_decode(
    render: Callable[..., Rendered],
) -> None:
    with pytest.raises(RenderError, match="%-escape"):
        render(sets=("redis.enabled=false", "worker.keda.enabled=true",
                     "redis.external.url=redis://:p%40ss@ext-redis:6380/2"))  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
def test_no_workload_has_both_an_hpa_and_a_keda_scaler(
    shapes: dict[str, Rendered], shape: str
) -> None:
    rendered = shapes[shape]
    hpa_targets = [
        o["spec"]["scaleTargetRef"]["name"] for o in rendered.of_kind("HorizontalPodAutoscaler")
    ]
    keda_targets = [o["spec"]["scaleTargetRef"]["name"] for o in rendered.of_kind("ScaledObject")]
    assert not set(hpa_targets) & set(keda_targets)
    assert len(hpa_targets) == len(set(hpa_targets))


# --- Redis and MLflow


def _redis_url_host(value: str) -> tuple[str, int, str]:
    parts = urlsplit(value)
    return parts.hostname or "", parts.port or 6379, parts.path


@pytest.mark.parametrize("shape", [s for s in SHAPES if s != "external-values"])
def test_redis_url_points_at_the_in_cluster_redis_service(
    shapes: dict[str, Rendered], shape: str
) -> None:
    rendered = shapes[shape]
    svc = rendered.get("Service", component("redis"))
    sts = rendered.get("StatefulSet", component("redis"))
    for name in (component("api"), component("worker")):
        env = env_of(container(rendered, "Deployment", name))
        host, port, path = _redis_url_host(env["LLM_REDIS_URL"]["value"])
        assert host == f"{svc['metadata']['name']}.{NAMESPACE}.svc"
        assert port == svc["spec"]["ports"][0]["port"]
        assert path == "/0"
        # The password comes apart from the URL (the settings encode it into it): one from an
        # existingSecret may hold '/', '#' or '@', which broke a URL built by substitution.
        assert "@" not in env["LLM_REDIS_URL"]["value"]
        ref = env["LLM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in rendered.get("Secret", ref["name"])["data"]
    # The Service's port reaches the StatefulSet's container port.
    redis = containers(sts["spec"]["template"]["spec"])[0]
    assert svc["spec"]["ports"][0]["targetPort"] in [p["name"] for p in redis["ports"]]


def test_redis_is_a_statefulset_with_aof_a_pvc_and_a_password(shapes: dict[str, Rendered]) -> None:
    rendered = shapes["cpu-values"]
    sts = rendered.get("StatefulSet", component("redis"))
    redis = containers(sts["spec"]["template"]["spec"])[0]
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert {"name": "data", "mountPath": "/data"} in redis["volumeMounts"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert sts["spec"]["serviceName"] in rendered.names("Service")
    secret = rendered.get("Secret", component("redis"))
    assert base64.b64decode(secret["data"]["redis-password"]).decode() == "ci-redis-password"


_REDIS_UNITS = {"": 1, "k": 1000, "kb": 1024, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}
_K8S_UNITS = {"Mi": 2**20, "Gi": 2**30, "M": 10**6, "G": 10**9}


@pytest.mark.parametrize("shape", [s for s in SHAPES if s != "external-values"])
def test_redis_refuses_writes_below_its_memory_limit_and_never_evicts(
    shapes: dict[str, Rendered], shape: str
) -> None:
    # Without maxmemory Redis grows into the container limit and is OOM-killed; with an
    # evicting policy it would drop Celery messages. noeviction refuses writes (the API: 503).
    sts = shapes[shape].get("StatefulSet", component("redis"))
    redis = containers(sts["spec"]["template"]["spec"])[0]
    args = redis["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = args[args.index("--maxmemory") + 1].lower()
    number, unit = re.fullmatch(r"(\d+)([a-z]*)", maxmemory).groups()
    cap = int(number) * _REDIS_UNITS[unit]
    limit = redis["resources"]["limits"]["memory"]
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", limit).groups()
    # Room for the AOF rewrite's fork (copy-on-write) and client buffers above the data.
    assert 0.5 <= cap / (int(number) * _K8S_UNITS[unit]) <= 0.8


@pytest.mark.parametrize("shape", [s for s in SHAPES if s != "external-values"])
def test_redis_keeps_each_jobs_events_stream_in_a_small_node(
    shapes: dict[str, Rendered], shape: str
) -> None:
    # Redis allocates a stream's newest node at stream-node-max-bytes and keeps it: with its
    # default (4096) each job's few-entry events stream held 4 KB for the job's whole TTL.
    # `lmctl stack up` and docker-compose.yml run Redis with the same size.
    sts = shapes[shape].get("StatefulSet", component("redis"))
    args = containers(sts["spec"]["template"]["spec"])[0]["args"]
    assert args[args.index("--stream-node-max-bytes") + 1] == str(STREAM_NODE_MAX_BYTES)


def test_a_large_stream_node_size_renders_as_plain_integer(render, tmp_path: Path) -> None:
    values = tmp_path / "node-values.yaml"
    values.write_text("redis:\n  streamNodeMaxBytes: 1048576\n")
    sts = render(values=(values,)).get("StatefulSet", component("redis"))
    args = containers(sts["spec"]["template"]["spec"])[0]["args"]
    assert args[args.index("--stream-node-max-bytes") + 1] == "1048576"


def test_generated_redis_password_is_long_and_url_safe(shapes: dict[str, Rendered]) -> None:
    secret = shapes["defaults"].get("Secret", component("redis"))
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    assert len(password) >= 32 and password.isalnum()


def test_external_redis_and_mlflow_replace_the_in_cluster_ones(shapes: dict[str, Rendered]) -> None:
    rendered = shapes["external-values"]
    assert not rendered.of_kind("StatefulSet")
    assert component("mlflow") not in rendered.names("Deployment")
    assert not rendered.of_kind("NetworkPolicy")  # nothing of ours left to protect
    external = yaml.safe_load((CHART / "ci" / "external-values.yaml").read_text())
    for name in (component("api"), component("worker")):
        env = env_of(container(rendered, "Deployment", name))
        ref = env["LLM_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert (
            rendered.get("Secret", ref["name"])["stringData"][ref["key"]]
            == external["redis"]["external"]["url"]
        )
        assert env["MLFLOW_TRACKING_URI"]["value"] == external["mlflow"]["external"]["trackingUri"]


@pytest.mark.parametrize("shape", [s for s in SHAPES if s != "external-values"])
def test_mlflow_uri_points_at_the_in_cluster_mlflow_service(
    shapes: dict[str, Rendered], shape: str
) -> None:
    rendered = shapes[shape]
    svc = rendered.get("Service", component("mlflow"))
    users = [container(rendered, "Deployment", component(n)) for n in ("api", "worker")]
    for job in rendered.of_kind("PyTorchJob"):
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            users += containers(replica["template"]["spec"])
    for c in users:
        parts = urlsplit(env_of(c)["MLFLOW_TRACKING_URI"]["value"])
        assert parts.scheme == "http"
        assert parts.hostname == f"{svc['metadata']['name']}.{NAMESPACE}.svc"
        assert parts.port == svc["spec"]["ports"][0]["port"]
    # MLflow accepts that Host header (it refuses unknown hosts).
    server = container(rendered, "Deployment", component("mlflow"))
    allowed = env_of(server)["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert f"{svc['metadata']['name']}.{NAMESPACE}.svc:*" in allowed
    # Every name a client may use for the Service (a notebook in another namespace writes
    # http://llm-mlflow.llm:5000), with and without the port.
    name = svc["metadata"]["name"]
    for host in (name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc",
                 f"{name}.{NAMESPACE}.svc.cluster.local"):  # fmt: skip
        assert {host, f"{host}:*"} <= set(allowed), host


def test_mlflow_keeps_sqlite_and_artifacts_on_its_pvc(shapes: dict[str, Rendered]) -> None:
    rendered = shapes["defaults"]
    deployment = rendered.get("Deployment", component("mlflow"))
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert env_of(server)["MLFLOW_BACKEND_STORE_URI"]["value"] == "sqlite:////mlflow/mlflow.db"
    assert "--artifacts-destination=/mlflow/artifacts" in server["args"]
    assert {"name": "data", "mountPath": "/mlflow"} in server["volumeMounts"]
    claim = next(v for v in pod["volumes"] if v["name"] == "data")["persistentVolumeClaim"][
        "claimName"
    ]
    assert claim in rendered.names("PersistentVolumeClaim")


@pytest.mark.parametrize("shape", ["defaults", "training-values"])
def test_mlflow_upgrades_its_database_schema_before_the_server_starts(
    shapes: dict[str, Rendered], shape: str
) -> None:
    # A newer MLflow image refuses to serve an out-of-date schema ("Detected out-of-date
    # database schema ... run 'mlflow db upgrade'") and would crash-loop after an image bump.
    pod = shapes[shape].get("Deployment", component("mlflow"))["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (server,) = pod["containers"]
    assert init["command"] == ["mlflow", "db", "upgrade", "$(MLFLOW_BACKEND_STORE_URI)"]
    for field in ("image", "env", "volumeMounts", "securityContext", "resources"):
        assert init[field] == server[field], field
    # A long migration or first start is not cut short by the liveness probe.
    startup = server["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def _run_mlflow_command(argv: list[str], env: dict[str, str]) -> None:
    """A container's argv run here: $(VAR) expanded as the kubelet does, mlflow from the venv."""
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in argv]
    mlflow = VENV_BIN / "mlflow"
    if not mlflow.is_file():
        pytest.skip("mlflow is not installed in this environment")
    proc = subprocess.run([str(mlflow), *expanded[1:]], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from MLflow's own migrations
def test_mlflow_db_upgrade_creates_a_new_database_and_migrates_an_old_one(
    shapes: dict[str, Rendered], tmp_path: Path
) -> None:
    pytest.importorskip("mlflow")
    import sqlalchemy
    from alembic import command
    from mlflow.store.db import utils as db_utils

    pod = shapes["defaults"].get("Deployment", component("mlflow"))["spec"]["template"]["spec"]
    argv = pod["initContainers"][0]["command"]
    head = db_utils._get_latest_schema_revision()

    def revision(url: str) -> str:
        with sqlalchemy.create_engine(url).connect() as conn:
            return conn.execute(sqlalchemy.text("select version_num from alembic_version")).scalar()

    # First install: no database yet; the init container creates it (as the server would).
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    _run_mlflow_command(argv, {"MLFLOW_BACKEND_STORE_URI": fresh, "HOME": str(tmp_path)})
    assert revision(fresh) == head
    # An image bump: a database a few migrations behind is brought to the new head.
    old = f"sqlite:///{tmp_path / 'old.db'}"
    older = [r.revision for r in db_utils.ScriptDirectory.from_config(
        db_utils._get_alembic_config(old)).walk_revisions()][3]  # fmt: skip
    engine = sqlalchemy.create_engine(old)
    db_utils.InitialBase.metadata.create_all(engine)
    config = db_utils._get_alembic_config(old)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, older)
    assert revision(old) == older != head
    _run_mlflow_command(argv, {"MLFLOW_BACKEND_STORE_URI": old, "HOME": str(tmp_path)})
    assert revision(old) == head


def test_mlflow_uses_an_external_postgres_from_a_secret(shapes: dict[str, Rendered]) -> None:
    rendered = shapes["training-values"]
    server = container(rendered, "Deployment", component("mlflow"))
    ref = env_of(server)["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    url = rendered.get("Secret", ref["name"])["stringData"][ref["key"]]
    assert url.startswith("postgresql://")


# --- network, config, hooks


def _peer_components(policy: dict) -> set[str]:
    (rule,) = policy["spec"]["ingress"]
    found = set()
    for peer in rule["from"]:
        labels = peer.get("podSelector", {}).get("matchLabels", {})
        if labels:
            assert labels["app.kubernetes.io/instance"] == RELEASE
            found.add(labels["app.kubernetes.io/component"])
    return found


def test_network_policies_let_only_api_and_workers_reach_redis_and_only_trainer_and_workers_mlflow(
    shapes: dict[str, Rendered],
) -> None:
    rendered = shapes["training-values"]
    redis = rendered.get("NetworkPolicy", component("redis"))
    assert redis["spec"]["policyTypes"] == ["Ingress"]
    assert _peer_components(redis) == {"api", "worker"}
    assert len(redis["spec"]["ingress"][0]["from"]) == 2  # no other peers
    mlflow = rendered.get("NetworkPolicy", component("mlflow"))
    assert _peer_components(mlflow) == {"trainer", "worker"}
    # The selected pods are really the ones labelled so.
    labels = {
        "api": rendered.get("Deployment", component("api"))["spec"]["template"]["metadata"][
            "labels"
        ],
        "worker": rendered.get("Deployment", component("worker"))["spec"]["template"]["metadata"][
            "labels"
        ],
        "trainer": rendered.of_kind("PyTorchJob")[0]["spec"]["pytorchReplicaSpecs"]["Master"][
            "template"
        ]["metadata"]["labels"],
    }
    for policy in (redis, mlflow):
        for peer in policy["spec"]["ingress"][0]["from"]:
            selector = peer["podSelector"]["matchLabels"]
            assert any(selector.items() <= pod.items() for pod in labels.values())
    # KEDA's operator may read the queue length.
    keda = shapes["keda-values"].get("NetworkPolicy", component("redis"))
    namespaces = [
        p["namespaceSelector"]["matchLabels"]
        for p in keda["spec"]["ingress"][0]["from"]
        if "namespaceSelector" in p
    ]
    assert namespaces == [{"kubernetes.io/metadata.name": "keda"}]


def test_hydra_config_configmap_is_the_repository_config(shapes: dict[str, Rendered]) -> None:
    link = CHART / "files" / "config"
    assert link.is_symlink() and link.resolve() == (REPO / "config").resolve(), (
        "charts/llm/files/config must be a link to ../../../config"
    )
    files = sorted(p for p in (REPO / "config").rglob("*.yaml") if p.is_file())
    if not files:
        pytest.skip("config/ has no Hydra config yet")
    rendered = shapes["defaults"]
    cm = rendered.get("ConfigMap", component("config"))
    expected = {
        str(p.relative_to(REPO / "config")).replace("/", "__"): p.read_text() for p in files
    }
    assert cm["data"] == expected
    # Mounted back as the same tree over the image's /app/config.
    pod = rendered.get("Deployment", component("worker"))["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "hydra-config")
    items = {i["key"]: i["path"] for i in volume["configMap"]["items"]}
    assert items == {k: k.replace("__", "/") for k in expected}
    mount = next(m for m in containers(pod)[0]["volumeMounts"] if m["name"] == "hydra-config")
    assert mount == {"name": "hydra-config", "mountPath": "/app/config", "readOnly": True}


def test_helm_test_hook_submits_a_job_and_polls_it(shapes: dict[str, Rendered]) -> None:
    rendered = shapes["cpu-values"]
    pods = [
        p
        for p in rendered.of_kind("Pod")
        if p["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"
    ]
    assert len(pods) == 1
    (c,) = pods[0]["spec"]["containers"]
    script = c["args"][0]
    compile(script, "helm-test", "exec")  # the inline script is valid Python
    assert '"POST", "/jobs"' in script and "/jobs/{job['id']}" in script
    env = env_of(c)
    url = urlsplit(env["LLM_URL"]["value"])
    assert url.hostname == f"{component('api')}.{NAMESPACE}.svc"
    assert url.port == rendered.get("Service", component("api"))["spec"]["ports"][0]["port"]
    assert env["LLM_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == component("api-keys")


def _last_env(container: dict, name: str) -> dict | None:
    """The entry Kubernetes uses: the last of that name."""
    found = [e for e in container.get("env") or [] if e["name"] == name]
    return found[-1] if found else None


def _notes(helm: str, *sets: str) -> str:
    cmd = [helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    for item in sets:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("NOTES:", 1)[1]


EXTRA_ENV_KEYS = (
    "settings.extraEnv[0].name=LLM_API_KEYS",
    "settings.extraEnv[0].valueFrom.secretKeyRef.name=corp-keys",
    "settings.extraEnv[0].valueFrom.secretKeyRef.key=keys",
)


@pytest.mark.parametrize(
    "sets",
    [
        ("api.ingress.enabled=true", *EXTRA_ENV_KEYS),
        ("settings.extraEnv[0].name=LLM_API_KEYS", "settings.extraEnv[0].value=key-aaaaaaaa"),
        ("apiKeys.keys={key-bbbbbbbb}", *EXTRA_ENV_KEYS),  # extraEnv's entry comes last: it wins
        ("apiKeys.keys={key-bbbbbbbb}",),
        ("apiKeys.existingSecret=llm-api-keys",),
        (),
    ],
    ids=["extraEnv-secret", "extraEnv-value", "extraEnv-over-apiKeys", "apiKeys", "existing",
         "none"],  # fmt: skip
)
def test_helm_test_pod_gets_the_api_keys_however_they_are_configured(
    render, helm: str, sets: tuple[str, ...]
) -> None:
    # Keys from settings.extraEnv satisfied the ingress guard and reached the API, but the test
    # pod POSTed /jobs without them (a 401 failed `helm test` on a healthy release) and NOTES
    # printed curl commands without the Authorization header.
    rendered = render(sets=sets)
    api_keys = _last_env(container(rendered, "Deployment", component("api")), "LLM_API_KEYS")
    (pod,) = [p for p in rendered.of_kind("Pod") if p["metadata"]["annotations"].get(
        "helm.sh/hook") == "test"]  # fmt: skip
    (submit,) = pod["spec"]["containers"]
    assert _last_env(submit, "LLM_API_KEYS") == api_keys
    notes = _notes(helm, *sets)
    assert ("Authorization: Bearer $LLM_API_KEY" in notes) == (api_keys is not None)
    if any(s.startswith("settings.extraEnv") for s in sets):
        assert f"exec deploy/{component('api')} -c api -- printenv LLM_API_KEYS" in notes
    elif api_keys is not None:
        assert "get secret" in notes and "jsonpath='{.data.LLM_API_KEYS}'" in notes


def test_notes_explain_how_to_reach_the_api_and_submit_a_job(helm: str) -> None:
    proc = subprocess.run(
        [
            helm,
            "install",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--dry-run=client",
            "--values",
            str(CHART / "ci" / "cpu-values.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"port-forward svc/{component('api')} 8000:8000" in notes
    assert "POST $LLM_URL/jobs" in notes and "$LLM_URL/jobs/<id>" in notes
    assert "Authorization: Bearer" in notes
    assert "helm test" in notes


def test_chart_metadata_declares_versions() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] and chart["version"]
    assert chart["kubeVersion"].startswith(">=1.30")
