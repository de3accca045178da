"""Every PyTorchJob we ship (the chart's training template and manifests/pytorchjob.yaml), field
by field against the kubeflow-training SDK's models and the PyTorchJob CRD's OpenAPI schema, and
the manifest kept the same job as the chart's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes.client.models as k8s_models
import kubernetes_validate
import pytest
import yaml
from kubeflow.training import models as kf_models

from tests.deploy.conftest import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    REPO,
    Rendered,
    RenderError,
    containers,
    env_of,
    schema_path,
)

pytestmark = pytest.mark.deploy

MANIFEST = REPO / "manifests" / "pytorchjob.yaml"
NAMESPACE_MANIFEST = REPO / "manifests" / "namespace.yaml"
TRAINING_VALUES = CHART / "ci" / "training-values.yaml"


def manifest_objects() -> list[dict]:
    return [o for o in yaml.safe_load_all(MANIFEST.read_text()) if o]


def manifest_job() -> dict:
    (job,) = [o for o in manifest_objects() if o["kind"] == "PyTorchJob"]
    return job


@pytest.fixture(scope="module")
def chart_jobs(render) -> dict[str, dict]:
    """The chart's PyTorchJob with training on and otherwise default values, and the CI shape."""
    jobs = {}
    for name, rendered in {
        "chart-defaults": render(sets=("training.enabled=true",)),
        "chart-training-values": render(values=(TRAINING_VALUES,)),
    }.items():
        (jobs[name],) = rendered.of_kind("PyTorchJob")
    return jobs


def all_jobs(chart_jobs: dict[str, dict]) -> dict[str, dict]:
    return {**chart_jobs, "manifest": manifest_job()}


JOB_IDS = ["chart-defaults", "chart-training-values", "manifest"]


# --- SDK model walk

_LIST = re.compile(r"^list\[(.+)\]$")
_DICT = re.compile(r"^dict\((\w+), (.+)\)$")


def _model_class(name: str) -> type:
    for module in (kf_models, k8s_models):
        cls = getattr(module, name, None)
        if cls is not None:
            return cls
    raise LookupError(f"no SDK model class {name}")


def model_errors(value: Any, type_name: str, path: str = "$") -> list[str]:
    """Fields of `value` the SDK model `type_name` does not know, or of the wrong type."""
    if type_name == "object":  # IntOrString, RawExtension, ...: anything
        return []
    if type_name == "str":
        return [] if isinstance(value, str) else [f"{path}: {value!r} is not a string"]
    if type_name == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: {value!r} is not an integer"]
    if type_name == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{path}: {value!r} is not a number"]
    if type_name == "bool":
        return [] if isinstance(value, bool) else [f"{path}: {value!r} is not a boolean"]
    if type_name == "datetime":
        return [] if isinstance(value, str) else [f"{path}: {value!r} is not a timestamp"]
    if m := _LIST.match(type_name):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(value) for e in model_errors(item, m[1], f"{path}[{i}]")]
    if m := _DICT.match(type_name):
        if not isinstance(value, dict):
            return [f"{path}: expected a map"]
        return [e for k, item in value.items() for e in model_errors(item, m[2], f"{path}.{k}")]
    cls = _model_class(type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} object"]
    by_json_name = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    errors = []
    for key, item in value.items():
        attr = by_json_name.get(key)
        if attr is None:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
        else:
            errors += model_errors(item, cls.openapi_types[attr], f"{path}.{key}")
    return errors


def test_model_walk_catches_unknown_fields_and_wrong_types() -> None:
    job = manifest_job()
    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["nprocPerNode"] = 1  # the SDK (and the CRD) want a string
    bad["spec"]["runPolicy"]["cleanupPolicy"] = "All"  # typo of cleanPodPolicy
    container = bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["cpu"] = 8
    errors = model_errors(bad, "KubeflowOrgV1PyTorchJob")
    assert any("nprocPerNode" in e for e in errors)
    assert any("cleanupPolicy: unknown field" in e for e in errors)
    assert any("limits.cpu" in e for e in errors)


@pytest.mark.parametrize("which", JOB_IDS)
def test_pytorchjob_matches_the_kubeflow_sdk_models(
    chart_jobs: dict[str, dict], which: str
) -> None:
    job = all_jobs(chart_jobs)[which]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert model_errors(job, "KubeflowOrgV1PyTorchJob") == []
    # And the SDK itself builds its model from it (required fields present).
    from kubeflow.training.api_client import ApiClient

    model = ApiClient()._ApiClient__deserialize(job, "KubeflowOrgV1PyTorchJob")
    assert set(model.spec.pytorch_replica_specs) <= {"Master", "Worker"}


# --- CRD schema


def _strict(schema: Any) -> Any:
    """The CRD's structural schema, with unknown fields rejected (the API server prunes them)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(schema_path("kubeflow.org_pytorchjobs.crd.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("which", JOB_IDS)
def test_pytorchjob_matches_the_crd_openapi_schema(
    chart_jobs: dict[str, dict], crd_validator: jsonschema.Draft7Validator, which: str
) -> None:
    job = all_jobs(chart_jobs)[which]
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in crd_validator.iter_errors(job)]
    assert errors == []


def test_crd_schema_check_rejects_unknown_fields(crd_validator: jsonschema.Draft7Validator) -> None:
    bad = yaml.safe_load(yaml.safe_dump(manifest_job()))
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "commands"
    ] = ["x"]
    assert list(crd_validator.iter_errors(bad))


# --- what the job does


def _replica_container(job: dict, replica: str) -> dict:
    (c,) = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("which", JOB_IDS)
def test_pytorchjob_runs_torchrun_on_master_and_workers(
    chart_jobs: dict[str, dict], which: str
) -> None:
    job = all_jobs(chart_jobs)[which]
    spec = job["spec"]
    assert set(spec["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] >= 1
    run_policy = spec["runPolicy"]
    assert run_policy["backoffLimit"] >= 0
    # Kept until deleted: after a TTL the next `helm upgrade` would recreate it and train again.
    assert "ttlSecondsAfterFinished" not in run_policy
    assert run_policy["cleanPodPolicy"] in ("None", "All", "Running")
    nproc = spec["nprocPerNode"]
    for replica in ("Master", "Worker"):
        c = _replica_container(job, replica)
        assert c["name"] == "pytorch"  # the operator looks the container up by name
        argv = c["command"] + c["args"]
        assert argv[0] == "torchrun"
        assert f"--nproc-per-node={nproc}" in argv
        # Cluster shape comes from the operator's PET_* variables, never hard-coded.
        assert not any(
            a.startswith(("--nnodes", "--node-rank", "--master-addr", "--master-port"))
            for a in argv
        )
        assert argv[argv.index("-m") + 1] == "services.trainer"
        assert "tracking.register_name=llm" in argv
        ckpt = next(a for a in argv if a.startswith("train.checkpoint_dir="))
        mount = next(m for m in c["volumeMounts"] if m["name"] == "checkpoints")
        # A folder per model on the shared volume: a resume refuses another model's checkpoints.
        assert ckpt == f"train.checkpoint_dir={mount['mountPath']}/${{model.name}}"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == nproc
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


@pytest.mark.parametrize("which", JOB_IDS)
def test_pytorchjob_logs_to_the_in_cluster_mlflow(chart_jobs: dict[str, dict], which: str) -> None:
    job = all_jobs(chart_jobs)[which]
    uri = env_of(_replica_container(job, "Master"))["MLFLOW_TRACKING_URI"]["value"]
    assert uri == f"http://{RELEASE}-mlflow.{NAMESPACE}.svc:5000"


def test_checkpoint_claims_exist(render) -> None:
    rendered: Rendered = render(values=(TRAINING_VALUES,))
    (job,) = rendered.of_kind("PyTorchJob")
    claim = _claim(job)
    pvc = rendered.get("PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    manifest_pvcs = {
        o["metadata"]["name"]: o for o in manifest_objects() if o["kind"] == "PersistentVolumeClaim"
    }
    assert _claim(manifest_job()) in manifest_pvcs


def _claim(job: dict) -> str:
    volumes = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
    return next(v for v in volumes if v["name"] == "checkpoints")["persistentVolumeClaim"][
        "claimName"
    ]


def test_trainer_gets_extra_env_like_the_api_and_workers(render) -> None:
    # An MLflow behind auth, S3 artifacts or a private CA need env in the trainer too.
    token = ("training.extraEnv[0].name=MLFLOW_TRACKING_TOKEN",
             "training.extraEnv[0].valueFrom.secretKeyRef.name=mlflow-token",
             "training.extraEnv[0].valueFrom.secretKeyRef.key=token",
             "training.extraEnv[1].name=REQUESTS_CA_BUNDLE",
             "training.extraEnv[1].value=/etc/ssl/certs/ca.pem")  # fmt: skip
    (job,) = render(sets=("training.enabled=true", *token)).of_kind("PyTorchJob")
    for replica in ("Master", "Worker"):
        env = env_of(_replica_container(job, replica))
        assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "mlflow-token",
            "key": "token",
        }
        assert env["REQUESTS_CA_BUNDLE"]["value"] == "/etc/ssl/certs/ca.pem"
        assert env["MLFLOW_TRACKING_URI"]["value"] == f"http://{RELEASE}-mlflow.{NAMESPACE}.svc:5000"
    with pytest.raises(RenderError, match="schema"):
        render(sets=("training.enabled=true", "training.extraEnv[0].value=no-name"))


def test_trainer_can_join_the_group_that_owns_an_nfs_checkpoint_share(render) -> None:
    # NFS-backed ReadWriteMany volumes ignore fsGroup: the share's gid must be the process's.
    (job,) = render(
        sets=("training.enabled=true", "training.supplementalGroups={10001,2000}")
    ).of_kind("PyTorchJob")
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        context = replica["template"]["spec"]["securityContext"]
        assert context["supplementalGroups"] == [10001, 2000]
        assert context["runAsUser"] == 10001 and context["fsGroup"] == 10001


def test_a_new_training_run_is_a_new_run_id(render) -> None:
    # The operator never reruns a finished PyTorchJob nor applies spec changes to one: only a
    # new name makes `helm upgrade` start a run.
    (first,) = render(sets=("training.enabled=true", "training.runId=1")).of_kind("PyTorchJob")
    (second,) = render(sets=("training.enabled=true", "training.runId=2")).of_kind("PyTorchJob")
    assert first["metadata"]["name"] == f"{RELEASE}-train-1"
    assert second["metadata"]["name"] == f"{RELEASE}-train-2"
    (named,) = render(
        sets=("training.enabled=true", "training.name=pretrain", "training.runId=2024-06-01")
    ).of_kind("PyTorchJob")
    assert named["metadata"]["name"] == "pretrain-2024-06-01"
    # Both runs resume from one checkpoint claim.
    assert _claim(first) == _claim(second)
    # A TTL stays possible (kubectl-managed jobs), and renders when set.
    (ttl,) = render(
        sets=("training.enabled=true", "training.runPolicy.ttlSecondsAfterFinished=3600")
    ).of_kind("PyTorchJob")
    assert ttl["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == 3600


def test_a_numeric_run_id_from_a_values_file_names_the_job_as_written(
    render, tmp_path: Path
) -> None:
    values = tmp_path / "run.yaml"
    values.write_text("training:\n  enabled: true\n  runId: 20261129\n")
    (job,) = render(values=(values,)).of_kind("PyTorchJob")
    assert job["metadata"]["name"] == f"{RELEASE}-train-20261129"  # not 2.0261129e+07


def test_a_run_id_too_long_for_the_pod_names_is_refused(render) -> None:
    too_long = ("training.enabled=true", "training.name=" + "a" * 40, "training.runId=run-2-retry")
    with pytest.raises(RenderError, match="over 50 characters"):
        render(sets=too_long)


def test_manifest_runs_the_same_job_as_the_chart(chart_jobs: dict[str, dict]) -> None:
    chart, manifest = chart_jobs["chart-defaults"], manifest_job()
    assert manifest["metadata"]["namespace"] == NAMESPACE
    assert manifest["spec"]["nprocPerNode"] == chart["spec"]["nprocPerNode"]
    assert manifest["spec"]["runPolicy"] == chart["spec"]["runPolicy"]
    for replica in ("Master", "Worker"):
        assert (
            manifest["spec"]["pytorchReplicaSpecs"][replica]["replicas"]
            == chart["spec"]["pytorchReplicaSpecs"][replica]["replicas"]
        )
        m, c = _replica_container(manifest, replica), _replica_container(chart, replica)
        for field in (
            "image",
            "command",
            "args",
            "env",
            "workingDir",
            "resources",
            "securityContext",
        ):
            assert m[field] == c[field], (
                f"{replica} {field}: manifest {m[field]} != chart {c[field]}"
            )
        m_pod = manifest["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
        c_pod = chart["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
        for field in ("securityContext", "runtimeClassName", "nodeSelector", "tolerations"):
            assert m_pod[field] == c_pod[field], field


def test_manifest_pods_are_admitted_to_mlflow_by_the_chart_network_policy(render) -> None:
    rendered = render(sets=("training.enabled=true",))
    policy = rendered.get("NetworkPolicy", f"{RELEASE}-mlflow")
    selectors = [p["podSelector"]["matchLabels"] for p in policy["spec"]["ingress"][0]["from"]]
    labels = manifest_job()["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"][
        "labels"
    ]
    assert any(s.items() <= labels.items() for s in selectors)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_manifest_builtin_objects_pass_kubernetes_validate_strict(kube_version: str) -> None:
    objects = manifest_objects()
    kinds = [o["kind"] for o in objects]
    assert kinds == ["PersistentVolumeClaim", "PyTorchJob"], "apply order"
    for obj in objects:
        if obj["kind"] == "PyTorchJob":
            continue  # the SDK and CRD checks above
        kubernetes_validate.validate(obj, kube_version, strict=True)
        assert obj["metadata"]["namespace"] == NAMESPACE
    (namespace,) = [o for o in yaml.safe_load_all(NAMESPACE_MANIFEST.read_text()) if o]
    kubernetes_validate.validate(namespace, kube_version, strict=True)
    assert (namespace["kind"], namespace["metadata"]["name"]) == ("Namespace", NAMESPACE)


def test_deleting_the_job_manifest_keeps_the_namespace() -> None:
    # `kubectl delete -f manifests/pytorchjob.yaml` (to run a finished job again) deletes every
    # object the file lists: a Namespace there would take Redis, MLflow and the checkpoints along.
    assert "Namespace" not in [o["kind"] for o in manifest_objects()]


def test_manifest_pod_hardening() -> None:
    for replica in ("Master", "Worker"):
        pod = manifest_job()["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in containers(pod):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(
                c["resources"]["limits"]
            )
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
