"""`lmctl` without servers: the PyTorchJob it builds, generation from a local model dir, and
errors that are one line on stderr with a non-zero exit."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from lmcore.checkpoint import load_model_dir, save_model_dir
from lmcore.config import preset
from lmcore.generate import SamplingParams, generate
from lmcore.model import Transformer
from lmcore.tokenizer import Tokenizer
from services import cli
from services.common.jobs import MAX_SEED
from services.trainer import pytorchjob

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CRD = REPO.parent / "shared" / "schemas" / "kubeflow.org_pytorchjobs.crd.yaml"


def lmctl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, contains: str) -> None:
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert contains in err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = Tokenizer.train(["the quick brown fox jumps over the lazy dog. " * 40], 300)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, n_layer=1))
    return save_model_dir(tmp_path_factory.mktemp("cli") / "model", model, tokenizer)


# -- submit-training ------------------------------------------------------------------------------


def dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code, out, err = lmctl(capsys, "submit-training", "--dry-run", *args)
    assert code == 0, err
    return yaml.safe_load(out)


def test_dry_run_prints_a_pytorchjob_with_master_and_workers(capsys) -> None:
    job = dry_run(capsys, "model=tiny", "train.max_steps=20", "--workers", "3",
                  "--nproc-per-node", "2", "--image", "registry.local/llm-trainer:dev")  # fmt: skip
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["spec"]["nprocPerNode"] == "2"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 3)
    for role in ("Master", "Worker"):
        [container] = specs[role]["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert container["image"] == "registry.local/llm-trainer:dev"
        assert container["command"] == ["torchrun"]
        args = container["args"]
        assert args[:3] == ["--nproc-per-node=2", "-m", "services.trainer"]
        assert "model=tiny" in args and "train.max_steps=20" in args
        assert not any(a.startswith("model=") and a != "model=tiny" for a in args)
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"].startswith("http")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_dry_run_job_validates_against_the_pytorchjob_crd(capsys) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    if not CRD.is_file():
        pytest.skip(f"PyTorchJob CRD schema not available at {CRD}")
    crd = yaml.safe_load(CRD.read_text())
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    job = dry_run(capsys, "model=tiny", "--tracking-uri", "http://mlflow.example:5000")
    jsonschema.validate(job, v1["schema"]["openAPIV3Schema"])
    [container] = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"


def test_dry_run_follows_the_manifest_conventions(capsys) -> None:
    manifest = REPO / "manifests" / "pytorchjob.yaml"
    if not manifest.is_file():
        pytest.skip("manifests/pytorchjob.yaml not written yet")
    [expected] = [d for d in yaml.safe_load_all(manifest.read_text()) if d["kind"] == "PyTorchJob"]
    job = dry_run(capsys)
    assert job["metadata"]["name"] == expected["metadata"]["name"]
    assert job["metadata"]["namespace"] == expected["metadata"]["namespace"]
    got = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    want = expected["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert got["containers"][0]["image"] == want["containers"][0]["image"]
    assert got["containers"][0]["args"] == want["containers"][0]["args"]
    assert got["containers"][0]["env"] == want["containers"][0]["env"]
    assert [v["name"] for v in got["volumes"]] == [v["name"] for v in want["volumes"]]


def test_the_built_in_job_is_the_manifest(tmp_path: Path) -> None:
    # An installed lmctl (no checkout) falls back to its built-in job: it must carry what the
    # manifest does, or its pods miss the labels the chart's MLflow NetworkPolicy admits, the
    # checkpoint claim and the non-root securityContext.
    manifest = REPO / "manifests" / "pytorchjob.yaml"
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    [expected_job] = [d for d in docs if d["kind"] == "PyTorchJob"]
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    expected_claims = {d["metadata"]["name"]: d for d in claims}
    missing = tmp_path / "no-checkout" / "pytorchjob.yaml"
    load_job, load_claims = pytorchjob.load_job_template, pytorchjob.load_job_claims
    assert load_job(missing) == load_job(manifest) == expected_job
    assert load_claims(missing) == load_claims(manifest) == expected_claims
    # Master and Worker are separate copies (an edit to one must not change the other).
    job = pytorchjob.load_job_template(missing)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"] is not replicas["Worker"]
    # And a job built from it mounts the claim it would create.
    built = pytorchjob.build_pytorchjob(["model=tiny"], template=job)
    assert pytorchjob.claims_of(built) == list(expected_claims)


def test_zero_workers_leaves_only_the_master(capsys) -> None:
    job = dry_run(capsys, "--workers", "0")
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_later_overrides_replace_the_same_key() -> None:
    base, extra = ["model=small", "train=gpu", "+x.y=1"], ["model=tiny", "~x.y"]
    merged = pytorchjob.merge_overrides(base, extra)
    assert merged == ["train=gpu", "model=tiny", "~x.y"]


def test_bad_training_override_is_rejected_before_submitting(capsys) -> None:
    code, out, err = lmctl(capsys, "submit-training", "--dry-run", "model=nope")
    assert_one_line_error(code, err, "model")
    assert out == ""


def test_submit_without_a_kube_context_is_one_line_error(capsys, tmp_path: Path) -> None:
    empty = tmp_path / "kubeconfig"
    empty.write_text("")
    code, _, err = lmctl(capsys, "submit-training", "model=tiny", "--kubeconfig", str(empty))
    assert_one_line_error(code, err, "--dry-run")


def template_with_tracking_env(entry: dict) -> dict:
    """The job template with its MLFLOW_TRACKING_URI entry (Master and Worker) replaced."""
    template = pytorchjob.load_job_template()
    for replica in template["spec"]["pytorchReplicaSpecs"].values():
        container = pytorchjob._container(replica)
        env = [e for e in container.get("env") or [] if e.get("name") != "MLFLOW_TRACKING_URI"]
        container["env"] = [*env, {"name": "MLFLOW_TRACKING_URI", **entry}]
    return template


def tracking_env(job: dict) -> dict[str, list[dict]]:
    return {role: [e for e in replica["template"]["spec"]["containers"][0]["env"]
                   if e["name"] == "MLFLOW_TRACKING_URI"]
            for role, replica in job["spec"]["pytorchReplicaSpecs"].items()}  # fmt: skip


def test_submit_training_keeps_tracking_uri_from_secret(
    capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The way to keep MLflow credentials out of the manifest: the URI comes from a Secret.
    # Reading only `value`, lmctl took it for unset and sent training to the default server.
    from_secret = {"valueFrom": {"secretKeyRef": {"name": "mlflow-creds", "key": "uri"}}}
    template = template_with_tracking_env(from_secret)
    monkeypatch.setattr(pytorchjob, "load_job_template", lambda *a, **k: json_copy(template))
    job = dry_run(capsys, "model=tiny", "--workers", "2")
    expected = [{"name": "MLFLOW_TRACKING_URI", **from_secret}]
    assert tracking_env(job) == {"Master": expected, "Worker": expected}
    # --tracking-uri still wins, as a plain value in every replica.
    job = dry_run(capsys, "model=tiny", "--tracking-uri", "http://mlflow.other:5000")
    plain = [{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.other:5000"}]
    assert tracking_env(job) == {"Master": plain, "Worker": plain}
    # A template that sets it nowhere, or to nothing, still gets the in-cluster server.
    unset = template_with_tracking_env({"value": ""})
    monkeypatch.setattr(pytorchjob, "load_job_template", lambda *a, **k: json_copy(unset))
    job = dry_run(capsys, "model=tiny")
    default = [{"name": "MLFLOW_TRACKING_URI", "value": pytorchjob.DEFAULT_CLUSTER_MLFLOW}]
    assert tracking_env(job) == {"Master": default, "Worker": default}


def json_copy(obj: dict) -> dict:
    return json.loads(json.dumps(obj))


@pytest.mark.parametrize("dry", [True, False])
def test_submit_training_refuses_credentials_in_tracking_uri(
    capsys, monkeypatch: pytest.MonkeyPatch, dry: bool
) -> None:
    submitted: list[object] = []
    monkeypatch.setattr(cli, "_submit", lambda *a, **k: submitted.append(a) or [])
    code, out, err = lmctl(capsys, "submit-training", *(["--dry-run"] if dry else []),
                           "model=tiny", "--tracking-uri",
                           "https://alice:s3cr3t-token@mlflow.example.com")  # fmt: skip
    assert code == 2
    assert_one_line_error(code, err, "MLFLOW_TRACKING_TOKEN")
    assert "MLFLOW_TRACKING_USERNAME" in err and "Secret" in err
    assert "s3cr3t" not in out + err and "alice" not in out + err
    assert out == "" and submitted == []
    with pytest.raises(pytorchjob.JobSpecError):
        pytorchjob.build_pytorchjob(tracking_uri="https://alice:s3cr3t-token@mlflow.example.com")


def test_dry_run_never_prints_credentials_a_template_holds(
    capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = template_with_tracking_env({"value": "https://bob:hunter2@mlflow.example.com"})
    for replica in template["spec"]["pytorchReplicaSpecs"].values():
        pytorchjob._container(replica)["env"] += [
            {"name": "MLFLOW_TRACKING_PASSWORD", "value": "pw-42"},
            {"name": "MLFLOW_TRACKING_TOKEN", "value": "tok-42"},
        ]
    monkeypatch.setattr(pytorchjob, "load_job_template", lambda *a, **k: json_copy(template))
    code, out, err = lmctl(capsys, "submit-training", "--dry-run", "model=tiny")
    assert code == 0, err
    for secret in ("bob", "hunter2", "pw-42", "tok-42"):
        assert secret not in out + err
    assert "https://***@mlflow.example.com" in out


class FakeCoreApi:
    """The two PersistentVolumeClaim calls of kubernetes' CoreV1Api, over a dict (no cluster
    here); reads of an absent claim raise the 404 the real client raises."""

    def __init__(self, existing: set[str]) -> None:
        self.claims = {name: {} for name in existing}
        self.created: list[tuple[str, dict]] = []

    def read_namespaced_persistent_volume_claim(self, name: str, namespace: str) -> dict:
        from kubernetes.client.exceptions import ApiException

        if name not in self.claims:
            raise ApiException(status=404, reason="Not Found")
        return self.claims[name]

    def create_namespaced_persistent_volume_claim(self, namespace: str, body: dict) -> None:
        self.claims[body["metadata"]["name"]] = body
        self.created.append((namespace, body))


def test_submitting_creates_the_checkpoint_claim_the_job_mounts_once() -> None:
    job = pytorchjob.build_pytorchjob(["model=tiny"], namespace="team-a")
    (claim,) = pytorchjob.claims_of(job)
    known = pytorchjob.load_job_claims()
    assert claim in known, "the manifest defines the claim its job mounts"
    api = FakeCoreApi(existing=set())
    assert pytorchjob.ensure_claims(api, job, "team-a", known) == [claim]
    ((namespace, body),) = api.created
    assert namespace == "team-a" and body["metadata"]["namespace"] == "team-a"
    assert body["spec"]["accessModes"] == ["ReadWriteMany"]  # Master and Worker share it
    assert known[claim]["metadata"]["namespace"] == "llm"  # the manifest's copy is untouched
    # A second submission finds it and creates nothing.
    assert pytorchjob.ensure_claims(api, job, "team-a", known) == []


def test_a_mounted_claim_nobody_defines_is_refused_before_any_is_created() -> None:
    job = pytorchjob.build_pytorchjob(["model=tiny"])
    api = FakeCoreApi(existing=set())
    with pytest.raises(pytorchjob.JobSpecError, match="does not exist"):
        pytorchjob.ensure_claims(api, job, "llm", known={})
    assert api.created == []


@pytest.fixture
def api_server_without_claims() -> Iterator[tuple[str, list[str]]]:
    """An HTTP Kubernetes API server that has nothing (404 to every request); its URL and the
    requests it got."""
    seen: list[str] = []

    class NotFound(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _not_found(self) -> None:
            seen.append(f"{self.command} {self.path}")
            data = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "reason": "NotFound", "code": 404}).encode()  # fmt: skip
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _not_found

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_submitting_a_job_that_mounts_a_claim_nobody_defines_is_a_one_line_error(
    capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    api_server_without_claims: tuple[str, list[str]],
) -> None:
    url, seen = api_server_without_claims
    template = pytorchjob.load_job_template()
    for replica in template["spec"]["pytorchReplicaSpecs"].values():
        for volume in replica["template"]["spec"]["volumes"]:
            if "persistentVolumeClaim" in volume:
                volume["persistentVolumeClaim"]["claimName"] = "nobody-defines-it"
    monkeypatch.setattr(pytorchjob, "load_job_template", lambda *a, **k: json_copy(template))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "empty",
        "clusters": [{"name": "empty", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": "abc"}}],
        "contexts": [{"name": "empty", "context": {"cluster": "empty", "user": "u"}}],
    }))  # fmt: skip
    code, out, err = lmctl(capsys, "submit-training", "model=tiny", "--kubeconfig", str(kubeconfig))
    assert (code, out) == (1, "")
    assert err == ("error: the job mounts PersistentVolumeClaim llm/nobody-defines-it, which does "
                   "not exist; create it first\n")  # fmt: skip
    assert seen == ["GET /api/v1/namespaces/llm/persistentvolumeclaims/nobody-defines-it"]


# -- generate -------------------------------------------------------------------------------------


def test_generate_prints_text_from_a_local_model_dir(capsys, model_dir: Path) -> None:
    args = ["--model", str(model_dir), "-n", "8", "--temperature", "0.7", "--top-k", "20"]
    code, out, err = lmctl(capsys, "generate", *args, "--seed", "3", "the")
    assert code == 0, err
    loaded = load_model_dir(model_dir)
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_k=20, seed=3)
    [expected] = generate(loaded.model, loaded.tokenizer, ["the"], params)
    assert out == "the" + expected.text + "\n"
    assert len(out) > len("the\n")


def test_generate_honours_the_seeds_inference_keys(capsys, model_dir: Path) -> None:
    """kv_cache, quantized and mixed_precision: greedy text agrees with the plain run."""
    base = ["--model", str(model_dir), "-n", "10", "--temperature", "0", "the"]
    _, plain, _ = lmctl(capsys, "generate", *base)
    code, recomputed, err = lmctl(capsys, "generate", "--no-kv-cache", *base)
    assert code == 0, err
    assert recomputed == plain
    code, int8, err = lmctl(capsys, "generate", "--quantized", "--mixed-precision", "fp32", *base)
    assert code == 0, err
    assert len(int8) > len("the\n")
    code, _, err = lmctl(capsys, "generate", "--mixed-precision", "fast", *base)
    assert_one_line_error(code, err, "--mixed-precision")


def test_generate_takes_the_seeds_precision_values_and_checks_them_before_loading(
    capsys, model_dir: Path, tmp_path: Path
) -> None:
    """--mixed-precision takes what LLM_MIXED_PRECISION and serve.mixed_precision take: any case,
    the seed's true (= auto) and false (= fp32); a bad --mixed-precision or --device is a usage
    error (exit 2) before the model is resolved (an MLflow download, maybe)."""
    base = ["--model", str(model_dir), "-n", "6", "--temperature", "0", "the"]
    _, plain, _ = lmctl(capsys, "generate", "--mixed-precision", "fp32", *base)
    for value in ("true", "False", "FP32", "Auto"):
        code, out, err = lmctl(capsys, "generate", "--mixed-precision", value, *base)
        assert code == 0, (value, err)
        assert out == plain  # on CPU every one of them is fp32
    code, out, err = lmctl(capsys, "generate", "--device", "CPU", *base)
    assert code == 0 and out == plain, err

    missing = ["--model", str(tmp_path / "missing"), "hi"]  # resolving it would fail (exit 1)
    for option, value in (("--mixed-precision", "fast"), ("--device", "meta"),
                          ("--device", "bogus")):  # fmt: skip
        code, out, err = lmctl(capsys, "generate", option, value, *missing)
        assert_one_line_error(code, err, option)
        assert code == 2 and "does not exist" not in err and out == "", (option, value, err)


@pytest.mark.parametrize("file", ["config.json", "model.safetensors"])
def test_generate_from_a_model_dirs_config_or_weights_file_uses_that_dir(
    capsys, model_dir: Path, file: str
) -> None:
    """load_model_dir takes either file for its dir; lmctl said "DIR/config.json is not a model
    dir (no config.json)"."""
    base = ["-n", "6", "--temperature", "0", "the"]
    _, from_dir, _ = lmctl(capsys, "generate", "--model", str(model_dir), *base)
    code, out, err = lmctl(capsys, "generate", "--model", str(model_dir / file), *base)
    assert code == 0, err
    assert out == from_dir


def test_generate_from_an_unknown_path_fails_in_one_line(capsys, tmp_path: Path) -> None:
    code, out, err = lmctl(capsys, "generate", "--model", str(tmp_path / "missing"), "hi")
    assert_one_line_error(code, err, "does not exist")
    assert out == ""


def test_generate_rejects_bad_sampling_values_in_one_line(capsys, model_dir: Path) -> None:
    code, _, err = lmctl(capsys, "generate", "--model", str(model_dir), "--top-p", "1.5", "hi")
    assert_one_line_error(code, err, "top_p")


# -- usage errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "contains"),
    [
        (["no-such-command"], "No such command"),
        (["promote", "--name", "llm"], "--version"),
        (["generate", "--model", "x", "--max-new-tokens", "lots"], "--max-new-tokens"),
        (["submit-training", "--dry-run", "--bogus"], "--bogus"),
    ],
)
def test_usage_errors_are_one_line(capsys, args: list[str], contains: str) -> None:
    code, _, err = lmctl(capsys, *args)
    assert_one_line_error(code, err, contains)


def test_train_passes_hydra_overrides_to_the_trainer(capsys) -> None:
    code, out, err = lmctl(capsys, "train", "--cfg", "model=tiny", "train.max_steps=7")
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["model"]["name"] == "tiny" and cfg["train"]["max_steps"] == 7


@pytest.mark.parametrize(
    ("override", "named"),
    [("model=nope", "model"), ("model=1", "model=small"), ("train.device=gpu0", "train.device"),
     ("hydra.run.dir=/tmp/x", "hydra.run.dir"),
     ("hydra/job_logging=disabled", "hydra/job_logging")],
)
def test_train_with_a_bad_override_exits_with_the_trainers_config_error(
    capsys, override: str, named: str
) -> None:
    code, _, err = lmctl(capsys, "train", override)
    assert code == 2 and named in err and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine has the device")
def test_generate_on_a_missing_cuda_device_is_a_one_line_error(capsys, model_dir: Path) -> None:
    code, _, err = lmctl(capsys, "generate", "--model", str(model_dir), "--device", "cuda", "hi")
    assert_one_line_error(code, err, "no CUDA device")


def test_console_entry_point_runs_as_a_process() -> None:
    proc = subprocess.run([sys.executable, "-m", "services.cli", "promote"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    help_text = subprocess.run([sys.executable, "-m", "services.cli", "--help"],
                               capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    for command in ("train", "generate", "promote", "submit-training"):
        assert command in help_text


# -- expected failures stay one line ------------------------------------------------------------


def test_generate_from_a_model_whose_logits_go_non_finite_is_a_one_line_error(
    capsys, tmp_path: Path
) -> None:
    # What a run diverged to inf registers: every weight NaN, so the first logits are too.
    tokenizer = Tokenizer.train(["the quick brown fox jumps over the lazy dog. " * 40], 300)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, n_layer=1))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    nan_dir = save_model_dir(tmp_path / "nan", model, tokenizer)
    code, out, err = lmctl(capsys, "generate", "--model", str(nan_dir), "-n", "4", "hi")
    assert_one_line_error(code, err, "NaN")
    assert out == ""


@pytest.mark.parametrize("command", [["promote", "--version", "1"],
                                     ["generate", "-m", "models:/llm@production", "hi"]])
def test_a_tracking_uri_mlflow_cannot_use_is_a_one_line_error(capsys, command: list[str]) -> None:
    code, out, err = lmctl(capsys, *command, "--tracking-uri", "bogus://x")
    assert_one_line_error(code, err, "cannot use tracking URI 'bogus://x'")
    assert out == ""


def test_submitting_to_an_unreachable_cluster_is_a_one_line_error(capsys, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": f"https://127.0.0.1:{port}",
                                                  "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "abc"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "u"}}],
    }))  # fmt: skip
    code, out, err = lmctl(capsys, "submit-training", "model=tiny", "--kubeconfig", str(kubeconfig))
    assert_one_line_error(code, err, "cannot reach the Kubernetes API server")
    assert "--dry-run" in err and "submitted" not in out


@pytest.fixture
def config_dir_with_bad_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """LLM_CONFIG_DIR: a copy of config/ with model/broken.yaml, whose line 2 is not YAML."""
    config = tmp_path / "config"
    shutil.copytree(REPO / "config", config)
    (config / "model" / "broken.yaml").write_text("name: tiny\nn_layer: 2\n  bad indent: 1\n")
    monkeypatch.setenv("LLM_CONFIG_DIR", str(config))
    return config / "model" / "broken.yaml"


@pytest.mark.parametrize("command", [["train"], ["submit-training", "--dry-run"]])
def test_a_config_file_that_is_not_yaml_is_a_config_error_naming_file_and_line(
    capsys, config_dir_with_bad_yaml: Path, command: list[str]
) -> None:
    code, out, err = lmctl(capsys, *command, "model=broken")
    assert code == 2 and out == ""
    assert_one_line_error(code, err, f"invalid YAML in {config_dir_with_bad_yaml}, line 3,")


def test_a_bad_override_with_nproc_per_node_fails_in_one_line_before_torchrun(capsys) -> None:
    code, _, err = lmctl(capsys, "train", "--nproc-per-node", "2", "model=tiny", "train.lrr=1")
    assert code == 2
    assert_one_line_error(code, err, "train.lrr")


@pytest.mark.parametrize(
    ("option", "value"),
    [("--api-port", "70000"), ("--redis-port", "-5"), ("--mlflow-port", "65536")],
)
def test_stack_up_refuses_a_port_out_of_range_in_one_line(
    capsys, tmp_path: Path, option: str, value: str
) -> None:
    root = tmp_path / ".stack"
    code, _, err = lmctl(capsys, "stack", "up", "--root", str(root), "--no-mlflow",
                         "--model-uri", str(tmp_path / "m"), option, value)  # fmt: skip
    assert code == 2
    assert_one_line_error(code, err, option)
    assert not root.exists()  # refused before anything started


# -- generate: the API's sampling bounds ----------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("--seed", "-1", "seed"), ("--seed", str(2**64 - 1), "seed"),
     ("--temperature", "50", "temperature"), ("--truncate", "right", "truncate")],
)
def test_generate_refuses_sampling_values_the_api_refuses(
    capsys, model_dir: Path, option: str, value: str, named: str
) -> None:
    code, out, err = lmctl(capsys, "generate", "--model", str(model_dir), option, value, "hi")
    assert code == 2 and out == ""
    assert_one_line_error(code, err, f"{named}: ")


def test_generate_accepts_the_apis_largest_seed(capsys, model_dir: Path) -> None:
    code, out, err = lmctl(capsys, "generate", "--model", str(model_dir), "-n", "2",
                           "--seed", str(MAX_SEED), "the")  # fmt: skip
    assert code == 0, err
    assert out.startswith("the")


def test_generate_truncates_a_long_prompt_on_the_left_when_asked(capsys, model_dir: Path) -> None:
    loaded = load_model_dir(model_dir)
    prompt = "the quick brown fox jumps over the lazy dog. " * 60
    assert len(loaded.tokenizer.encode(prompt)) > loaded.model.config.block_size
    code, _, err = lmctl(capsys, "generate", "--model", str(model_dir), "-n", "4", prompt)
    assert_one_line_error(code, err, "--truncate left")

    code, out, err = lmctl(capsys, "generate", "--model", str(model_dir), "-n", "4",
                           "--temperature", "0", "--truncate", "left", "--no-echo", prompt)
    assert code == 0, err
    [expected] = generate(loaded.model, loaded.tokenizer, [prompt],
                          SamplingParams(max_new_tokens=4, temperature=0), truncate="left")
    assert out == expected.text + "\n"
