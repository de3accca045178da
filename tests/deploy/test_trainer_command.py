"""The PyTorchJob's command, run for real: the Master and Worker containers of
manifests/pytorchjob.yaml as two local processes with the environment the training operator
gives them. Only what must change on a laptop is rewritten (addresses, paths, tiny model, CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import REPO

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # SQLAlchemy, inside MLflow
]

MANIFEST = REPO / "manifests" / "pytorchjob.yaml"
VENV_BIN = Path(sys.executable).parent
TIMEOUT_S = 900  # two tokenizers, two DDP processes and an MLflow registration on 2 busy cores
WORDS = (
    "the king and queen walk by the river while a fool sings of bread and wine to lords "
    "who know nothing of winter storms or the sea"
).split()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
        for _ in range(1500)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _local_argv(container: dict, checkpoints: Path, corpus: Path) -> list[str]:
    """command + args of the container, with the cluster-only parts swapped for local ones."""
    argv = list(container["command"]) + list(container["args"])
    assert argv[0] == "torchrun"
    argv[0] = str(VENV_BIN / "torchrun")
    swaps = {
        "model=": "model=tiny",
        "train=": "train=cpu",
        "train.checkpoint_dir=": f"train.checkpoint_dir={checkpoints}",
    }
    out = []
    for arg in argv:
        prefix = next((p for p in swaps if arg.startswith(p)), None)
        out.append(swaps[prefix] if prefix else arg)
    return out + [
        "train.max_steps=4",
        "train.eval_interval=2",
        "data=text",
        f"data.source={corpus}",
    ]


def _operator_env(
    container: dict,
    *,
    node_rank: int,
    nnodes: int,
    nproc: str,
    port: int,
    tmp: Path,
    tracking_uri: str,
) -> dict[str, str]:
    """The container's env as the training operator and kubelet would set it, made local."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PET_", "MLFLOW_", "LLM_")) and k not in ("RANK", "WORLD_SIZE")
    }
    for item in container.get("env") or []:
        env[item["name"]] = item["value"]
    env.update(
        {
            "MLFLOW_TRACKING_URI": tracking_uri,
            "HOME": str(tmp / "home"),
            "PYTHONPATH": str(REPO),  # the image's ENV PYTHONPATH=/app
            "OMP_NUM_THREADS": "1",
            # Set by the training operator for every replica.
            "PET_NNODES": str(nnodes),
            "PET_NPROC_PER_NODE": nproc,
            "PET_NODE_RANK": str(node_rank),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(nnodes * int(nproc)),
            "RANK": str(node_rank),
        }
    )
    (tmp / "home").mkdir(exist_ok=True)
    return env


def test_pytorchjob_command_trains_and_registers_with_two_local_nodes(tmp_path: Path) -> None:
    if importlib.util.find_spec("services.trainer") is None:
        pytest.skip("services.trainer not available")
    job = next(
        o for o in yaml.safe_load_all(MANIFEST.read_text()) if o and o["kind"] == "PyTorchJob"
    )
    replicas = job["spec"]["pytorchReplicaSpecs"]
    nodes = [("Master", 0)] + [("Worker", i + 1) for i in range(replicas["Worker"]["replicas"])]
    nproc = job["spec"]["nprocPerNode"]
    port = _free_port()
    corpus = _corpus(tmp_path / "corpus.txt")
    checkpoints = tmp_path / "checkpoints"  # the shared PVC
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = []
    try:
        for replica, node_rank in nodes:
            (c,) = replicas[replica]["template"]["spec"]["containers"]
            workdir = tmp_path / f"{replica.lower()}-{node_rank}"  # the pod's /workspace emptyDir
            workdir.mkdir()
            env = _operator_env(
                c,
                node_rank=node_rank,
                nnodes=len(nodes),
                nproc=nproc,
                port=port,
                tmp=workdir,
                tracking_uri=tracking_uri,
            )
            log = (workdir / "log.txt").open("wb")
            procs.append(
                (
                    replica,
                    node_rank,
                    log,
                    subprocess.Popen(
                        _local_argv(c, checkpoints, corpus),
                        cwd=workdir,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    ),
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        for replica, node_rank, log, proc in procs:
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
            log.close()
            output = (tmp_path / f"{replica.lower()}-{node_rank}" / "log.txt").read_text(
                errors="replace"
            )
            assert code == 0, f"{replica} (node {node_rank}) exited {code}:\n{output[-4000:]}"
    finally:
        for *_, proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()

    # Both nodes trained together: the checkpoint records one sampler per rank.
    states = sorted(checkpoints.glob("step-*/state.json"))
    assert states, f"no checkpoint in {checkpoints}"
    extra = json.loads(states[-1].read_text())["extra"]
    assert extra["world_size"] == len(nodes) * int(nproc)
    # The run registered the model the workers will serve.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    versions = client.search_model_versions("name='llm'")
    assert versions, "no version of model 'llm' was registered"
