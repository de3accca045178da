"""The PyTorchJob that `lmctl submit-training` sends: built from manifests/pytorchjob.yaml (or
its built-in copy), the checkpoint claims it mounts, and the copy shown without credentials.

Dicts in, dicts out, plus the Kubernetes SDK; no typer and no exit codes: what cannot be built or
submitted raises JobSpecError, which the CLI turns into its one-line error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PYTORCHJOB_MANIFEST = REPO / "manifests" / "pytorchjob.yaml"
DEFAULT_IMAGE = "llm-trainer:0.1.0"
DEFAULT_NAMESPACE = "llm"
DEFAULT_JOB_NAME = "llm-train"
DEFAULT_CLUSTER_MLFLOW = "http://llm-mlflow.llm.svc:5000"
CONTAINER_NAME = "pytorch"  # the training operator finds the container by this name


class JobSpecError(Exception):
    """A job this module refuses to build or submit; the message is for the user as is."""


def _override_key(override: str) -> str:
    """The config key an override sets: `+a.b=1` and `~a.b` -> `a.b`."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """`base` with each key that `extra` sets replaced, `extra`'s new keys appended."""
    replaced = {_override_key(o) for o in extra}
    return [o for o in base if _override_key(o) not in replaced] + list(extra)


def load_job_template(path: Path = PYTORCHJOB_MANIFEST) -> dict[str, Any]:
    """The PyTorchJob document of manifests/pytorchjob.yaml, or its built-in copy (an installed
    lmctl has no checkout)."""
    import yaml

    if path.is_file():
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "PyTorchJob":
                # JSON round trip: YAML anchors make Master and Worker share one dict.
                return json.loads(json.dumps(doc))
    return _default_job_template()


def load_job_claims(path: Path = PYTORCHJOB_MANIFEST) -> dict[str, dict[str, Any]]:
    """The PersistentVolumeClaims manifests/pytorchjob.yaml defines beside its job, by name (the
    built-in copy without a checkout)."""
    import yaml

    if not path.is_file():
        return _default_job_claims()
    return {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(path.read_text())
            if isinstance(doc, dict) and doc.get("kind") == "PersistentVolumeClaim"}  # fmt: skip


def claims_of(job: dict[str, Any]) -> list[str]:
    """The claim names the job's pods mount, in order, once each."""
    names: list[str] = []
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        for volume in replica["template"]["spec"].get("volumes") or []:
            name = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if name and name not in names:
                names.append(name)
    return names


def ensure_claims(core_api: Any, job: dict[str, Any], namespace: str,
                  known: dict[str, dict[str, Any]]) -> list[str]:  # fmt: skip
    """Create each claim the job mounts that the namespace lacks and `known` defines (the
    manifest's checkpoint volume): without it every pod stays Pending. Returns those created."""
    from kubernetes.client.exceptions import ApiException

    created = []
    for name in claims_of(job):
        try:
            core_api.read_namespaced_persistent_volume_claim(name, namespace)
            continue
        except ApiException as exc:
            if exc.status != 404:
                raise
        if name not in known:
            raise JobSpecError(f"the job mounts PersistentVolumeClaim {namespace}/{name}, which "
                               "does not exist; create it first")  # fmt: skip
        body = json.loads(json.dumps(known[name]))
        body["metadata"]["namespace"] = namespace
        core_api.create_namespaced_persistent_volume_claim(namespace, body)
        created.append(name)
    return created


# The built-in copy of manifests/pytorchjob.yaml, for an installed lmctl without a checkout:
# the same labels (the chart's MLflow NetworkPolicy admits only app.kubernetes.io/component
# trainer pods of instance llm), checkpoint claim, volumes, securityContext and GPU placement.
# tests/unit/test_cli.py::test_the_built_in_job_is_the_manifest keeps the two identical.
DEFAULT_CHECKPOINT_CLAIM = "llm-train-checkpoints"
_TRAINER_LABELS = {
    "app.kubernetes.io/name": "llm",
    "app.kubernetes.io/instance": "llm",
    "app.kubernetes.io/component": "trainer",
}


def _default_job_claims() -> dict[str, dict[str, Any]]:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": DEFAULT_CHECKPOINT_CLAIM, "namespace": DEFAULT_NAMESPACE,
                     "labels": dict(_TRAINER_LABELS)},  # fmt: skip
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "50Gi"}}},
    }
    return {DEFAULT_CHECKPOINT_CLAIM: claim}


def _default_job_template() -> dict[str, Any]:
    container = {
        "name": CONTAINER_NAME,
        "image": DEFAULT_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "workingDir": "/workspace",
        "command": ["torchrun"],
        "args": ["--nproc-per-node=1", "-m", "services.trainer", "model=small", "train=gpu",
                 "train.checkpoint_dir=/checkpoints/${model.name}",
                 "tracking.register_name=llm"],  # fmt: skip
        "env": [
            {"name": "MLFLOW_TRACKING_URI", "value": DEFAULT_CLUSTER_MLFLOW},
            {"name": "HOME", "value": "/tmp"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "resources": {
            "requests": {"cpu": "4", "memory": "16Gi"},
            "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"},
        },
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},  # fmt: skip
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "checkpoints", "mountPath": "/checkpoints"},
            {"name": "workspace", "mountPath": "/workspace"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    pod_spec = {
        "automountServiceAccountToken": False,
        "runtimeClassName": "nvidia",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
            {"name": "checkpoints",
             "persistentVolumeClaim": {"claimName": DEFAULT_CHECKPOINT_CLAIM}},  # fmt: skip
            {"name": "workspace", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        ],
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    replica = {
        "replicas": 1,
        "restartPolicy": "OnFailure",
        "template": {"metadata": {"labels": dict(_TRAINER_LABELS)}, "spec": pod_spec},
    }
    # The JSON round trip gives Master and Worker their own copies.
    return json.loads(json.dumps({
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": DEFAULT_JOB_NAME, "namespace": DEFAULT_NAMESPACE,
                     "labels": dict(_TRAINER_LABELS)},  # fmt: skip
        "spec": {
            "nprocPerNode": "1",
            "runPolicy": {"backoffLimit": 3, "cleanPodPolicy": "Running"},
            "pytorchReplicaSpecs": {"Master": replica, "Worker": replica},
        },
    }))  # fmt: skip


def _container(replica: dict[str, Any]) -> dict[str, Any]:
    containers = replica["template"]["spec"]["containers"]
    return next((c for c in containers if c.get("name") == CONTAINER_NAME), containers[0])


def _trainer_overrides(args: Sequence[str]) -> list[str]:
    """The Hydra overrides in a `torchrun ... -m services.trainer OVERRIDES` argument list."""
    args = list(args)
    for i in range(len(args) - 1):
        if args[i] == "-m" and args[i + 1] == "services.trainer":
            return args[i + 2 :]
    return []


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    """Set `name` to a plain value, replacing its entry (a `valueFrom` one included)."""
    env = container.setdefault("env", [])
    for item in env:
        if item.get("name") == name:
            item.clear()
            item.update({"name": name, "value": value})
            return
    env.append({"name": name, "value": value})


def build_pytorchjob(
    overrides: Sequence[str] = (),
    *,
    image: str | None = None,
    workers: int = 1,
    nproc_per_node: int = 1,
    namespace: str | None = None,
    name: str | None = None,
    tracking_uri: str | None = None,
    template: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The PyTorchJob as a dict: the manifest's pod spec with this image, size and overrides.

    Master + `workers` Worker pods, each running `torchrun --nproc-per-node=N -m services.trainer`.
    """
    job = json.loads(json.dumps(template or load_job_template()))
    meta = job.setdefault("metadata", {})
    meta["name"] = name or meta.get("name") or DEFAULT_JOB_NAME
    meta["namespace"] = namespace or meta.get("namespace") or DEFAULT_NAMESPACE
    spec = job["spec"]
    spec["nprocPerNode"] = str(nproc_per_node)
    replicas = spec["pytorchReplicaSpecs"]
    master = replicas["Master"]
    worker_template = replicas.get("Worker") or json.loads(json.dumps(master))
    base_args = _container(master).get("args") or []
    args = [f"--nproc-per-node={nproc_per_node}", "-m", "services.trainer",
            *merge_overrides(_trainer_overrides(base_args), overrides)]  # fmt: skip
    specs = {"Master": master, "Worker": worker_template} if workers else {"Master": master}
    for role, replica in specs.items():
        replica["replicas"] = 1 if role == "Master" else workers
        container = _container(replica)
        container["command"] = ["torchrun"]
        container["args"] = list(args)
        if image:
            container["image"] = image
        if tracking_uri:
            _set_env(container, "MLFLOW_TRACKING_URI", tracking_uri_without_credentials(
                tracking_uri))  # fmt: skip
        elif not _env_is_set(container, "MLFLOW_TRACKING_URI"):
            _set_env(container, "MLFLOW_TRACKING_URI", DEFAULT_CLUSTER_MLFLOW)
        # else the template's own entry stays as written: a plain value, or a valueFrom
        # (secretKeyRef) that keeps credentials out of the job, which reading only `value`
        # used to take for unset and replace with the default server.
        limits = container.get("resources", {}).get("limits", {})
        if "nvidia.com/gpu" in limits:  # one GPU per process
            limits["nvidia.com/gpu"] = str(nproc_per_node)
    spec["pytorchReplicaSpecs"] = specs
    return job


def _env_is_set(container: dict[str, Any], name: str) -> bool:
    """Whether the container sets `name`: a plain value, or a `valueFrom` (a Secret's key)."""
    entry = next((e for e in container.get("env") or [] if e.get("name") == name), {})
    return bool(entry.get("value") or entry.get("valueFrom"))


_CREDENTIAL_ENV = re.compile(r"PASSWORD|TOKEN|SECRET|CREDENTIAL|API_?KEY", re.IGNORECASE)


def tracking_uri_without_credentials(uri: str) -> str:
    """`uri`, refused if it carries credentials: they would be a plain env value in the job,
    readable by anyone who may get pytorchjobs or pods, and printed by --dry-run."""
    from lmcore.mlflow_client import redact_uri

    if redact_uri(uri) != uri:
        raise JobSpecError(
            f"--tracking-uri {redact_uri(uri)} holds credentials, which would be written into the "
            "PyTorchJob in plain text: give the URI without them and put "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, in "
            "the trainer's env from a Secret (valueFrom.secretKeyRef)")  # fmt: skip
    return uri


def redacted_job(job: dict[str, Any]) -> dict[str, Any]:
    """A copy of the job to show (--dry-run): credentials in URIs become `***@`, and plain env
    values of credential-like variables (_CREDENTIAL_ENV) `***`."""
    from lmcore.mlflow_client import redact_uri

    def redact(node: Any) -> Any:
        if isinstance(node, dict):
            shown = {k: redact(v) for k, v in node.items()}
            name = shown.get("name")  # an env entry: {"name": ..., "value": ...}
            if isinstance(name, str) and shown.get("value") and _CREDENTIAL_ENV.search(name):
                shown["value"] = "***"
            return shown
        if isinstance(node, list):
            return [redact(v) for v in node]
        return redact_uri(node) if isinstance(node, str) else node

    return redact(job)


def to_sdk_job(job: dict[str, Any]) -> Any:
    """The dict as kubeflow-training's KubeflowOrgV1PyTorchJob (the SDK's models check it)."""
    from kubeflow.training import ApiClient

    class _Response:  # ApiClient.deserialize reads JSON from a response's .data
        data = json.dumps(job)

    return ApiClient().deserialize(_Response(), "KubeflowOrgV1PyTorchJob")


def sdk_job_yaml(sdk_job: Any) -> str:
    """The SDK job as the YAML a `kubectl apply -f` takes (what --dry-run prints)."""
    import yaml
    from kubeflow.training import ApiClient

    return yaml.safe_dump(ApiClient().sanitize_for_serialization(sdk_job), sort_keys=False)
