"""The Dockerfile parsed without a Docker engine: targets, COPY sources, layer order, non-root
users, health checks, and entry points that name modules which exist; the same entry-point check
over every command the compose file, the chart and the manifests run."""

from __future__ import annotations

import fnmatch
import re

import pytest
import yaml

from tests.deploy.conftest import REPO, Rendered, containers
from tests.deploy.entrypoints import (
    Dockerfile,
    entry_point_problem,
    entry_points,
    parse_dockerfile,
)

pytestmark = pytest.mark.deploy

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
# target -> the command it must run
TARGETS = {
    "api": [
        "uvicorn",
        "services.api.app:create_app",
        "--factory",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ],
    "worker": ["celery", "-A", "services.worker.celery_app:app", "worker", "--pool", "threads"],
    "worker-gpu": ["celery", "-A", "services.worker.celery_app:app", "worker", "--pool", "threads"],
    "trainer": ["torchrun"],
    "trainer-cpu": ["torchrun"],
    "mlflow": ["mlflow", "server"],
}
GPU_TARGETS = ("worker-gpu", "trainer")


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE)


def ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def is_ignored(path: str, patterns: list[str]) -> bool:
    path = path.rstrip("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        candidates = [path] + [path.rsplit("/", i)[0] for i in range(1, path.count("/") + 1)]
        if any(
            fnmatch.fnmatch(c, pattern) or fnmatch.fnmatch(c, pattern.removeprefix("**/"))
            for c in candidates
        ):
            ignored = not negate
    return ignored


def test_dockerfile_has_a_target_per_service(dockerfile: Dockerfile) -> None:
    assert set(TARGETS) <= set(dockerfile.stages)


@pytest.mark.parametrize("target", TARGETS)
def test_target_runs_the_real_entry_point(dockerfile: Dockerfile, target: str) -> None:
    cmd = dockerfile.effective(target, "CMD")
    assert cmd is not None and cmd.exec_form() is not None, f"{target}: CMD in exec form"
    argv = cmd.exec_form()
    expected = TARGETS[target]
    assert argv[: len(expected)] == expected
    if expected[0] == "torchrun":
        assert argv[argv.index("-m") + 1] == "services.trainer"
        assert "tracking.register_name=llm" in argv


@pytest.mark.parametrize("target", TARGETS)
def test_target_runs_as_a_non_root_user(dockerfile: Dockerfile, target: str) -> None:
    user = dockerfile.effective(target, "USER")
    assert user is not None, f"{target}: no USER"
    uid = dockerfile.substitute(user.rest).split(":")[0]
    assert uid not in ("0", "root", ""), f"{target} runs as {uid}"
    # The USER comes after the last RUN that needs root (nothing reverts it).
    chain = [i for s in dockerfile.chain(target) for i in s.instructions]
    assert chain.index(user) > max(i for i, ins in enumerate(chain) if ins.keyword == "RUN")


def test_api_and_workers_have_health_checks(dockerfile: Dockerfile) -> None:
    api = dockerfile.effective("api", "HEALTHCHECK").exec_form()
    assert any("/healthz" in word for word in api)
    for target in ("worker", "worker-gpu"):
        assert dockerfile.effective(target, "HEALTHCHECK").exec_form() == [
            "python",
            "-m",
            "services.worker.healthcheck",
        ]


def test_gpu_targets_use_a_cuda_runtime_base_and_a_matching_torch_build(
    dockerfile: Dockerfile,
) -> None:
    args = dockerfile.global_args
    cuda = re.match(r"(\d+)\.(\d+)", args["CUDA_VERSION"])
    assert cuda, args["CUDA_VERSION"]
    assert args["TORCH_CUDA_INDEX"].endswith(f"/cu{cuda[1]}{cuda[2]}"), (
        "the torch wheel index must match the CUDA runtime of the base image"
    )
    for target in GPU_TARGETS:
        assert dockerfile.root_image(target).startswith("nvidia/cuda:")
        assert "-runtime-" in dockerfile.root_image(target)
        runs = [i.rest for s in dockerfile.chain(target) for i in s.all("RUN")]
        assert any('"torch==${TORCH_VERSION}"' in r and "TORCH_CUDA_INDEX" in r for r in runs)
    for target in ("api", "worker", "trainer-cpu"):
        assert not dockerfile.root_image(target).startswith("nvidia/")
        runs = [i.rest for s in dockerfile.chain(target) for i in s.all("RUN")]
        assert any("TORCH_CPU_INDEX" in r for r in runs)


def test_gpu_targets_carry_the_c_compiler_and_python_headers_triton_builds_with(
    dockerfile: Dockerfile,
) -> None:
    # torch.compile on CUDA (train=gpu, the worker's CUDA-graph decode step) has Triton build
    # its launcher at first use; the CUDA runtime base has neither gcc nor Python.h.
    for target in GPU_TARGETS:
        runs = " ".join(i.rest for s in dockerfile.chain(target) for i in s.all("RUN"))
        installed = set(re.findall(r"[\w.+-]+", runs.split("apt-get install", 1)[-1]))
        assert {"gcc", "libc6-dev", "python3-dev"} <= installed, target


def test_every_mlflow_client_is_the_server_images_release(dockerfile: Dockerfile) -> None:
    pins = [
        m
        for stage in dockerfile.stages.values()
        for run in stage.all("RUN")
        for m in re.findall(r'"(mlflow(?:-skinny)?)([^"]*)"', run.rest)
    ]
    assert {name for name, _ in pins} == {"mlflow", "mlflow-skinny"}
    assert all(spec == "==${MLFLOW_VERSION}" for _, spec in pins), pins


@pytest.mark.parametrize("target", ["worker", "worker-gpu"])
def test_worker_threads_come_from_the_settings(dockerfile: Dockerfile, target: str) -> None:
    # A fixed --concurrency overrides LLM_WORKER_CONCURRENCY (default 2 x LLM_MAX_BATCH): with
    # fewer threads than engine slots, jobs wait in the queue while slots stay empty.
    assert "--concurrency" not in dockerfile.effective(target, "CMD").exec_form()


def test_torch_pin_matches_the_makefile(dockerfile: Dockerfile) -> None:
    makefile = (REPO / "Makefile").read_text()
    pinned = re.search(r"^TORCH_VERSION \?= (\S+)", makefile, re.M)
    if pinned is None:
        pytest.skip("the Makefile pins no torch version")
    assert dockerfile.global_args["TORCH_VERSION"] == pinned[1]


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "mlflow"])
def test_dependency_layers_come_before_the_source(dockerfile: Dockerfile, target: str) -> None:
    chain = [i for s in dockerfile.chain(target) for i in s.instructions]
    deps = [
        n
        for n, i in enumerate(chain)
        if i.keyword == "RUN" and re.search(r'pip install .*"\.\[', i.rest)
    ]
    source = [
        n
        for n, i in enumerate(chain)
        if i.keyword == "COPY" and i.flags_and_args()[0].get("from") == "source"
    ]
    assert deps and source, target
    assert max(deps) < min(source), (
        f"{target}: dependencies must be installed before the code is copied"
    )
    # The dependency layer sees only pyproject.toml.
    for n in range(max(deps)):
        if chain[n].keyword == "COPY":
            flags, words = chain[n].flags_and_args()
            assert "from" in flags or words[:-1] == ["pyproject.toml"], chain[n].rest


def test_every_copy_source_exists_and_is_not_dockerignored(dockerfile: Dockerfile) -> None:
    patterns = ignore_patterns()
    names = list(dockerfile.stages)
    problems = []
    for stage in dockerfile.stages.values():
        for ins in stage.all("COPY") + stage.all("ADD"):
            flags, words = ins.flags_and_args()
            sources = words[:-1]
            assert sources, f"line {ins.line}: COPY needs a source and a destination"
            if "from" in flags:
                if flags["from"] not in names[: names.index(stage.name)]:
                    problems.append(
                        f"line {ins.line}: --from={flags['from']} is not an earlier stage"
                    )
                continue
            for src in sources:
                if not list(REPO.glob(src.rstrip("/"))):
                    problems.append(f"line {ins.line}: {src} does not exist in the build context")
                elif is_ignored(src, patterns):
                    problems.append(f"line {ins.line}: {src} is excluded by .dockerignore")
    assert not problems, "\n".join(problems)


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = ignore_patterns()
    for heavy in (".git", ".venv", ".tools", "mlruns", "checkpoints", ".cache", "tests", "charts"):
        assert is_ignored(heavy, patterns), heavy
    for needed in (
        "pyproject.toml",
        "lmcore/model.py",
        "services/api/app.py",
        "config/config.yaml",
    ):
        assert not is_ignored(needed, patterns), needed


# --- entry points everywhere


def _commands(dockerfile: Dockerfile, shapes: dict[str, Rendered]) -> list[tuple[list[str], str]]:
    found: list[tuple[list[str], str]] = []
    for target in TARGETS:
        for keyword in ("CMD", "ENTRYPOINT", "HEALTHCHECK"):
            ins = dockerfile.effective(target, keyword)
            if ins is not None and ins.exec_form():
                found.append((ins.exec_form(), f"Dockerfile {target} {keyword}"))
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        if isinstance(service.get("command"), list):
            found.append((service["command"], f"docker-compose {name}"))
        test = (service.get("healthcheck") or {}).get("test") or []
        if test[:1] == ["CMD"]:
            found.append((test[1:], f"docker-compose {name} healthcheck"))
    manifests = [
        o
        for p in (REPO / "manifests").glob("*.yaml")
        for o in yaml.safe_load_all(p.read_text())
        if o
    ]
    objects = [("manifests", o) for o in manifests]
    objects += [(f"chart {shape}", o) for shape, r in shapes.items() for o in r.objects]
    for where, obj in objects:
        for pod in _pod_specs(obj):
            for c in containers(pod):
                argv = list(c.get("command") or []) + list(c.get("args") or [])
                found.append((argv, f"{where} {obj['kind']}/{obj['metadata']['name']}:{c['name']}"))
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    exec_ = (c.get(probe) or {}).get("exec")
                    if exec_:
                        found.append(
                            (exec_["command"], f"{where} {obj['metadata']['name']} {probe}")
                        )
    return found


def _pod_specs(obj: dict) -> list[dict]:
    spec = obj.get("spec") or {}
    if obj["kind"] == "Pod":
        return [spec]
    if "template" in spec:
        return [spec["template"]["spec"]]
    if obj["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in spec["pytorchReplicaSpecs"].values()]
    return []


def test_every_entry_point_names_a_module_that_exists(
    dockerfile: Dockerfile, shapes: dict[str, Rendered]
) -> None:
    commands = _commands(dockerfile, shapes)
    entries = {e for argv, where in commands for e in entry_points(argv, where)}
    modules = {e.module for e in entries}
    # The three services and the worker health check are all among them.
    assert {
        "services.api.app",
        "services.worker.celery_app",
        "services.trainer",
        "services.worker.healthcheck",
    } <= modules
    problems = sorted({p for e in entries if (p := entry_point_problem(REPO, e))})
    assert not problems, "\n".join(problems)
