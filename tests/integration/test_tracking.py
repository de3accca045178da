"""lmcore.tracking, lmcore.registry and lmcore.model_uri against a real `mlflow server`
(SQLite + local artifacts) on a free port.

No mocks: runs, registry, aliases, the pyfunc and an outage (server killed and restarted on the
same port and backend) all go through MLflow's own client and server.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmcore import tracking
from lmcore.checkpoint import load_model_dir, save_model_dir
from lmcore.config import preset
from lmcore.generate import SamplingParams, generate
from lmcore.mlflow_client import ModelNotFoundError, TrackingError
from lmcore.model import Transformer
from lmcore.model_uri import resolve_model_uri
from lmcore.registry import current_version, promote
from lmcore.tokenizer import Tokenizer
from lmcore.tracking import (
    TRACKER_HTTP_DEFAULTS,
    MlflowTracker,
    NullTracker,
    flatten_params,
)
from tests.helpers.mlflow_server import MlflowServer, free_port, running_server

pytestmark = pytest.mark.integration

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def make_model_dir(path: Path, seed: int = 0) -> Path:
    tokenizer = Tokenizer.train([TEXT], vocab_size=300)
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, n_layer=1))
    return save_model_dir(path, model, tokenizer, {"seed": seed})


@pytest.fixture(scope="module")
def mlflow_process(tmp_path_factory: pytest.TempPathFactory):
    """One server for the module; the outage test kills it and leaves it restarted."""
    with running_server(tmp_path_factory.mktemp("mlflow")) as process:
        yield process


@pytest.fixture(scope="module")
def server(mlflow_process: MlflowServer) -> str:
    return mlflow_process.uri


@pytest.fixture(scope="module")
def registered(server: str, tmp_path_factory: pytest.TempPathFactory):
    """One finished run with a registered model version (alias candidate) shared by the tests."""
    model_dir = make_model_dir(tmp_path_factory.mktemp("model") / "model")
    tracker = MlflowTracker(server, retry_s=0.5)
    run_id = tracker.start_run("registered", params={"model": {"n_layer": 1}})
    info = tracker.log_model_dir(model_dir, register_name="llm-test")
    tracker.end_run()
    return {"run_id": run_id, "info": info, "model_dir": model_dir}


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# -- pure helpers and import rules ---------------------------------------------------------------


def test_flatten_params_joins_nested_keys_and_caps_long_values() -> None:
    flat = flatten_params({"model": {"n_layer": 2, "mlp": "swiglu"}, "files": list(range(400)),
                           "lr": 1e-3, "opt": {"betas": [0.9, 0.95]}})  # fmt: skip
    assert flat["model.n_layer"] == "2"
    assert flat["model.mlp"] == "swiglu"
    assert flat["opt.betas"] == "[0.9, 0.95]"
    assert flat["lr"] == "0.001"
    assert len(flat["files"]) == tracking.MAX_PARAM_VALUE_CHARS and flat["files"].endswith("...")


def test_importing_tracking_and_pyfunc_does_not_import_mlflow() -> None:
    code = ("import sys, lmcore.tracking, lmcore.registry, lmcore.model_uri, lmcore.mlflow_pyfunc; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_null_tracker_accepts_the_tracker_calls() -> None:
    null = NullTracker()
    assert null.start_run("exp", None, {"a": 1}) is None
    null.log_metrics({"loss": 1.0}, 1)
    null.log_artifact("/nonexistent")
    assert null.log_model_dir("/nonexistent", "llm") is None
    null.end_run("FINISHED")
    assert null.run_id is None


# -- a run ----------------------------------------------------------------------------------------


def test_run_logs_params_metrics_and_artifacts(server: str) -> None:
    tracker = MlflowTracker(server, retry_s=0.5)
    run_id = tracker.start_run("runs", None, {"model": {"n_layer": 2}, "train": {"lr": 0.002}})
    for step in range(3):
        tracker.log_metrics({"train_loss": 5.0 - step, "lr": 0.002, "tokens_per_s": 100.0}, step)
    with tempfile.TemporaryDirectory() as tmp:  # gone before the poster thread uploads it
        config = Path(tmp) / "config.yaml"
        config.write_text("model:\n  n_layer: 2\n")
        tracker.log_artifact(config)
    tracker.log_text("hello", "notes/readme.txt")
    tracker.end_run()

    run = client(server).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.n_layer"] == "2"
    assert run.data.params["train.lr"] == "0.002"
    history = client(server).get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(0, 5.0), (1, 4.0), (2, 3.0)]
    artifacts = {a.path for a in client(server).list_artifacts(run_id)}
    assert {"config.yaml", "notes"} <= artifacts
    local = client(server).download_artifacts(run_id, "config.yaml", tempfile.mkdtemp())
    assert Path(local).read_text() == "model:\n  n_layer: 2\n"


def test_resumed_run_logs_into_the_same_run(server: str) -> None:
    first = MlflowTracker(server, retry_s=0.5)
    run_id = first.start_run("resume", None, {"train": {"max_steps": 2}})
    first.log_metrics({"train_loss": 3.0}, 1)
    first.end_run("KILLED")

    second = MlflowTracker(server, retry_s=0.5)
    assert second.start_run("resume", run_id, {"train": {"max_steps": 4}}) == run_id
    second.log_metrics({"train_loss": 2.0}, 2)
    second.end_run()

    run = client(server).get_run(run_id)
    steps = [m.step for m in client(server).get_metric_history(run_id, "train_loss")]
    assert steps == [1, 2]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "2"  # MLflow params are immutable ...
    assert run.data.tags["resumed.train.max_steps"] == "4"  # ... so the new value is a tag


def test_resuming_an_unknown_run_is_a_clear_error(server: str) -> None:
    with pytest.raises(ModelNotFoundError, match="cannot resume run 0123"):
        MlflowTracker(server).start_run("resume", "0123456789abcdef0123456789abcdef")


# -- model registry and resolution ---------------------------------------------------------------


def test_logged_model_is_registered_with_the_candidate_alias(server: str, registered) -> None:
    info = registered["info"]
    assert (info.name, info.version, info.run_id) == ("llm-test", "1", registered["run_id"])
    assert info.uri == "models:/llm-test/1"
    assert current_version("llm-test", "candidate", server) == info
    assert current_version("llm-test", "production", server) is None
    assert current_version("no-such-model", "candidate", server) is None
    tags = client(server).get_run(registered["run_id"]).data.tags
    assert tags["llm.model_version"] == "llm-test/1"


@pytest.mark.parametrize("form", ["alias", "version", "run", "logged_model"])
def test_model_uris_resolve_to_the_logged_model_dir(
    server: str, registered, tmp_path: Path, form: str
) -> None:
    run_id = registered["run_id"]
    logged_id = client(server).get_model_version("llm-test", "1").source.removeprefix("models:/")
    uri = {
        "alias": "models:/llm-test@candidate",
        "version": "models:/llm-test/1",
        "run": f"runs:/{run_id}/model",
        "logged_model": f"models:/{logged_id}",
    }[form]
    resolved = resolve_model_uri(uri, cache_dir=tmp_path, tracking_uri=server)
    assert resolved.run_id == run_id and resolved.uri == uri
    assert resolved.path.is_relative_to(tmp_path)
    original = (registered["model_dir"] / "model.safetensors").read_bytes()
    assert (resolved.path / "model.safetensors").read_bytes() == original
    assert load_model_dir(resolved.path).metadata == {"seed": 0}
    if form in ("alias", "version"):
        assert (resolved.name, resolved.version) == ("llm-test", "1")


def test_resolution_downloads_once_then_reuses_the_cache(
    server: str, registered, tmp_path: Path
) -> None:
    first = resolve_model_uri("models:/llm-test@candidate", tmp_path, server)
    marker = first.path / "model.safetensors"
    inode = marker.stat().st_ino
    again = resolve_model_uri("models:/llm-test/1", tmp_path, server)
    assert again.path == first.path
    assert marker.stat().st_ino == inode  # the same file, not a fresh download


def test_local_model_dir_passes_through(registered) -> None:
    resolved = resolve_model_uri(str(registered["model_dir"]))
    assert resolved.path == registered["model_dir"].resolve()
    assert (resolved.name, resolved.version, resolved.run_id) == (None, None, None)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/llm-test@nope", "not found"),
        ("models:/llm-test/99", "not found"),
        ("models:/no-such-model/1", "not found"),
        ("runs:/0123456789abcdef0123456789abcdef/model", "not found"),
        ("/nonexistent/model", "does not exist"),
    ],
)
def test_unknown_models_are_clear_errors(server: str, tmp_path: Path, uri: str, message: str):
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_model_uri(uri, cache_dir=tmp_path, tracking_uri=server)


def test_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not a model dir"):
        resolve_model_uri(str(tmp_path))
    with pytest.raises(TrackingError, match="unsupported model URI"):
        resolve_model_uri("s3://bucket/model")


def test_pyfunc_loads_from_the_registry_and_predicts_text(
    server: str, registered, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.pyfunc
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    pyfunc = mlflow.pyfunc.load_model("models:/llm-test@candidate")
    frame = pd.DataFrame({"prompt": ["the quick", "lazy"], "max_new_tokens": [6, 3],
                          "seed": [1, 2], "temperature": [1.0, 0.0]})  # fmt: skip
    texts = pyfunc.predict(frame)

    loaded = load_model_dir(registered["model_dir"])
    expected = generate(loaded.model, loaded.tokenizer, ["the quick", "lazy"],
                        [SamplingParams(max_new_tokens=6, seed=1, temperature=1.0),
                         SamplingParams(max_new_tokens=3, seed=2, temperature=0.0)])  # fmt: skip
    assert texts == [g.text for g in expected]
    assert all(isinstance(t, str) and t for t in texts)
    # Rows may leave settings out (pandas fills the gaps with NaN): defaults apply.
    rows = pyfunc.predict([{"prompt": "fox"}, {"prompt": "dog", "max_new_tokens": 2, "seed": 3}])
    assert len(rows) == 2 and all(isinstance(t, str) for t in rows)
    again = generate(loaded.model, loaded.tokenizer, ["dog"], SamplingParams(max_new_tokens=2,
                                                                            seed=3))  # fmt: skip
    assert rows[1] == again[0].text


def test_promotion_moves_the_alias(server: str, tmp_path: Path) -> None:
    tracker = MlflowTracker(server, retry_s=0.5)
    tracker.start_run("promote")
    for seed in (0, 1):
        latest = tracker.log_model_dir(make_model_dir(tmp_path / f"m{seed}", seed), "llm-promote")
    tracker.end_run()
    assert latest.version == "2"
    assert current_version("llm-promote", "candidate", server).version == "2"

    promote("llm-promote", 1, "production", server)
    assert current_version("llm-promote", "production", server).version == "1"
    promote("llm-promote", "2", "production", server)
    assert current_version("llm-promote", "production", server).version == "2"
    resolved = resolve_model_uri("models:/llm-promote@production", tmp_path / "cache", server)
    assert resolved.version == "2"
    assert load_model_dir(resolved.path).metadata == {"seed": 1}
    with pytest.raises(ModelNotFoundError, match="llm-promote/99 not found"):
        promote("llm-promote", 99, "production", server)


def test_a_local_sqlite_store_keeps_artifacts_beside_its_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # MLflow's own default would put ./mlruns here
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    tracker = MlflowTracker(uri)
    tracker.start_run("local")
    tracker.log_metrics({"train_loss": 1.0}, 1)
    info = tracker.log_model_dir(make_model_dir(tmp_path / "model"), "llm-local")
    tracker.end_run()

    resolved = resolve_model_uri("models:/llm-local@candidate", tmp_path / "cache", uri)
    assert (resolved.path / "model.safetensors").is_file() and resolved.version == info.version
    assert list(workdir.iterdir()) == []
    assert (tmp_path / "store" / "mlruns").is_dir()


class _LosesFirstReply(http.server.BaseHTTPRequestHandler):
    """Forwards to the server, but answers the first request to a path ending in `lose` with a
    503 after the server has done it: a reply lost on the way back, as through a restarting
    proxy."""

    upstream = ""
    lose = ""
    lost: list[bytes] = []

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "content-length")}  # fmt: skip
        request = urllib.request.Request(
            self.upstream + self.path, data=self.rfile.read(length) if length else None,
            method=self.command, headers=headers,
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                code, body = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            code, body = exc.code, exc.read()
        if self.path.endswith(self.lose) and not self.lost:
            self.lost.append(body)
            code, body = 503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "proxy"}'
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _lossy_proxy(server: str, lose: str) -> Iterator[tuple[str, list[bytes]]]:
    handler = type("Handler", (_LosesFirstReply,), {"upstream": server, "lose": lose, "lost": []})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{proxy.server_port}", handler.lost
    finally:
        proxy.shutdown()
        proxy.server_close()


@pytest.fixture
def lossy_proxy(server: str) -> Iterator[tuple[str, list[bytes]]]:
    with _lossy_proxy(server, "/model-versions/create") as proxy:
        yield proxy


@pytest.mark.parametrize("retried_by", ["mlflow", "tracker"])
def test_a_retried_registration_whose_reply_was_lost_leaves_one_version(
    server: str, lossy_proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retried_by: str
) -> None:
    if retried_by == "tracker":  # no retries inside MLflow's client: the tracker's own retry
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    proxy_uri, lost = lossy_proxy
    name = f"llm-lost-reply-{retried_by}"
    tracker = MlflowTracker(proxy_uri, retry_s=0.5)
    tracker.start_run("lost-reply")
    info = tracker.log_model_dir(make_model_dir(tmp_path / "model"), name)
    tracker.end_run()
    assert lost, "the proxy never dropped a reply"
    versions = client(server).search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"]
    assert info.version == "1"
    assert current_version(name, "candidate", server).version == "1"


@pytest.mark.parametrize("retried_by", ["mlflow", "tracker"])
@pytest.mark.parametrize("lose", ["/runs/outputs", "/MLmodel"])
def test_an_upload_whose_reply_was_lost_is_retried_to_one_registered_model(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retried_by: str, lose: str
) -> None:
    """The run's link to its model, or a file of the model, reaches the server but not its
    answer: the retry must finish the upload, not fail on what the first attempt did."""
    if retried_by == "tracker":
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    name = f"llm-lost-upload-{retried_by}-{lose.strip('/').replace('/', '-')}"
    with _lossy_proxy(server, lose) as (proxy_uri, lost):
        tracker = MlflowTracker(proxy_uri, retry_s=0.5)
        tracker.start_run("lost-upload")
        info = tracker.log_model_dir(make_model_dir(tmp_path / "model"), name)
        tracker.end_run()
        assert lost, f"the proxy never dropped a reply to {lose}"
    outputs = client(server).get_run(info.run_id).outputs.model_outputs
    assert len(outputs) == 1
    resolved = resolve_model_uri(f"models:/{name}@candidate", tmp_path / "cache", server)
    assert (resolved.path / "model.safetensors").is_file() and resolved.version == "1"


# -- outages --------------------------------------------------------------------------------------


def test_metrics_logged_while_the_server_is_down_are_posted_after_restart(
    mlflow_process: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow's own HTTP retries would hide the outage for minutes; the tracker must cope alone.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = mlflow_process
    tracker = MlflowTracker(server.uri, retry_s=0.5)
    run_id = tracker.start_run("outage")
    tracker.log_metrics({"train_loss": 4.0}, 0)
    assert tracker.flush(30)
    quitter = MlflowTracker(server.uri, retry_s=0.5, flush_timeout_s=1.0)
    quitter.start_run("outage")

    server.kill()
    try:
        started = time.monotonic()
        for step in (1, 2, 3):
            tracker.log_metrics({"train_loss": 4.0 - step}, step)
        tracker.log_params({"late": {"param": 1}})
        assert time.monotonic() - started < 1.0  # logging never waits on the network
        assert not tracker.flush(3.0)  # nothing can be posted while it is down
        assert tracker.pending >= 3 and tracker.last_error
        down_ms = int(time.time() * 1000)
        # A run ending during the outage gives up after its flush timeout instead of hanging.
        quitter.log_metrics({"train_loss": 1.0}, 1)
        started = time.monotonic()
        quitter.end_run()
        assert time.monotonic() - started < 15
    finally:
        server.start()  # same port, same SQLite file and artifact dir
    assert tracker.flush(60)
    history = client(server.uri).get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(0, 4.0), (1, 3.0), (2, 2.0), (3, 1.0)]
    assert all(m.timestamp <= down_ms for m in history)  # logged times, not posting times
    assert client(server.uri).get_run(run_id).data.params["late.param"] == "1"
    tracker.end_run()
    assert client(server.uri).get_run(run_id).info.status == "FINISHED"


class _Relay:
    """A plain forwarding proxy in front of the module's server. stop() closes its port, which
    is an outage for whoever talks through it (the server and its data stay); start() brings
    it back on the same port."""

    def __init__(self, upstream: str) -> None:
        self.handler = type("Relay", (_LosesFirstReply,),
                            {"upstream": upstream, "lose": "/never-lost", "lost": []})  # fmt: skip
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> _Relay:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def relay(server: str) -> Iterator[_Relay]:
    proxy = _Relay(server).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def within(seconds: float, fn, *args):  # noqa: ANN001, ANN201
    """fn(*args) in a thread, failing the test if it has not returned after `seconds` (an old
    MLflow call retrying for minutes is left behind as a daemon thread)."""
    out: list = []

    def call() -> None:
        try:
            out.append(("ok", fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out.append(("raised", exc))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds} s"
    kind, value = out[0]
    if kind == "raised":
        raise value
    return value


def test_resuming_while_the_server_is_down_keeps_the_run_and_posts_when_it_is_back(
    server: str, relay: _Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preempted job restarting during an outage used to fail start_run (TrackingError, not
    the LookupError the trainer starts a new run on), so every restart exited 1."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    first = MlflowTracker(relay.uri, retry_s=0.5)
    run_id = first.start_run("resume-offline", None, {"train": {"max_steps": 2, "lr": 0.1}})
    first.log_metrics({"train_loss": 3.0}, 1)
    first.end_run("KILLED")

    relay.stop()
    second = MlflowTracker(relay.uri, retry_s=0.5)
    params = {"train": {"max_steps": 4, "lr": 0.1}, "world_size": 2}
    assert within(10, second.start_run, "resume-offline", run_id, params) == run_id
    second.log_metrics({"train_loss": 2.0}, 2)
    assert not second.flush(1.0) and second.last_error
    relay.start()
    assert second.flush(30)
    second.end_run()

    run = client(server).get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client(server).get_metric_history(run_id, "train_loss")]
    assert steps == [1, 2]
    assert run.data.params["train.max_steps"] == "2" and run.data.params["world_size"] == "2"
    assert run.data.tags["resumed.train.max_steps"] == "4"
    assert "resumed.train.lr" not in run.data.tags


def test_resuming_a_deleted_run_is_not_found_so_a_new_run_starts(server: str) -> None:
    """A run deleted in the UI (a clean-up of a killed run) cannot be resumed: the tracker says
    not found (LookupError), which is what makes the trainer start a new run."""
    first = MlflowTracker(server, retry_s=0.5)
    run_id = first.start_run("resume-deleted")
    first.end_run("KILLED")
    client(server).delete_run(run_id)
    with pytest.raises(ModelNotFoundError, match=f"cannot resume run {run_id}"):
        within(30, MlflowTracker(server).start_run, "resume-deleted", run_id)


def test_runs_uri_resolves_after_more_than_a_page_of_logged_models(
    server: str, tmp_path: Path
) -> None:
    """Every training run logs a `model` into the same experiment; only the newest 100 came
    back from the experiment-wide search, so an older run's runs:/RUN/model stopped resolving."""
    tracker = MlflowTracker(server, retry_s=0.5)
    run_id = tracker.start_run("page")
    tracker.log_model_dir(make_model_dir(tmp_path / "model"), register_name=None)
    tracker.end_run()
    mlflow = client(server)
    experiment_id = mlflow.get_run(run_id).info.experiment_id
    for _ in range(101):  # later runs' models, newest first in a search
        mlflow.create_logged_model(experiment_id, name="model")
    resolved = resolve_model_uri(f"runs:/{run_id}/model", tmp_path / "cache", server)
    assert resolved.run_id == run_id
    assert (resolved.path / "model.safetensors").read_bytes() == (
        tmp_path / "model" / "model.safetensors").read_bytes()


def test_runs_uri_skips_an_unfinished_newer_logged_model(server: str, registered, tmp_path):
    """A later publish of the same run that died after creating its logged model (a resumed
    job killed during its upload) leaves a newer PENDING model, which used to hide the good one."""
    run_id = registered["run_id"]
    mlflow = client(server)
    experiment_id = mlflow.get_run(run_id).info.experiment_id
    pending = mlflow.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    assert str(pending.status) != "READY"
    resolved = resolve_model_uri(f"runs:/{run_id}/model", tmp_path / "cache", server)
    assert (resolved.path / "model.safetensors").read_bytes() == (
        registered["model_dir"] / "model.safetensors").read_bytes()


MLFLOW_HTTP_SETTINGS = tuple(TRACKER_HTTP_DEFAULTS)


def _end_killed_during_an_outage(
    tracker: MlflowTracker, relay: _Relay, caplog: pytest.LogCaptureFixture
) -> tuple[str, float]:
    """Start a run, post one metric, cut MLflow off, queue another, end the run KILLED (as the
    trainer's SIGTERM path does); the run id and the seconds end_run took."""
    run_id = tracker.start_run("end-outage")
    assert tracker.flush(30)
    relay.stop()
    tracker.log_metrics({"train_loss": 1.0}, 1)
    caplog.set_level(logging.WARNING, logger="lmcore.tracking")
    started = time.monotonic()
    within(15, tracker.end_run, "KILLED")
    return run_id, time.monotonic() - started


def test_end_run_during_an_outage_returns_within_its_flush_timeout_with_default_mlflow_retries(
    server: str, relay: _Relay, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """end_run's final status used to be a synchronous call that MLflow's own HTTP retries
    (the trainer's default settings) kept trying for ~4 minutes, far past flush_timeout_s and a
    SIGTERMed pod's 30 s grace period."""
    for key in MLFLOW_HTTP_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    tracker = MlflowTracker(relay.uri, retry_s=0.5, flush_timeout_s=2.0)
    run_id, seconds = _end_killed_during_an_outage(tracker, relay, caplog)
    assert seconds < 5.0
    # The metric and the run's status, and why: not "0 records (None)".
    assert f"2 tracking records, the run's KILLED status included, not posted for run {run_id}" \
        in caplog.text
    assert "(None)" not in caplog.text
    for key in MLFLOW_HTTP_SETTINGS:  # the bound the tracker set, left for the process
        assert os.environ[key] == TRACKER_HTTP_DEFAULTS[key]
    assert client(server).get_run(run_id).info.status == "RUNNING"


def test_a_killed_run_waits_its_own_short_flush_timeout_during_an_outage(
    relay: _Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """The trainer ends a SIGTERMed run KILLED; waiting the 120 s flush timeout then outlasted a
    pod's 30 s grace period (the checkpoint is saved before, so only the exit was lost)."""
    tracker = MlflowTracker(relay.uri, retry_s=0.5, flush_timeout_s=120.0,
                            killed_flush_timeout_s=1.0)  # fmt: skip
    run_id, seconds = _end_killed_during_an_outage(tracker, relay, caplog)
    assert seconds < 5.0
    assert f"the run's KILLED status included, not posted for run {run_id}" in caplog.text


def test_a_cancel_during_a_finished_runs_flush_cuts_it_to_the_killed_timeout(
    relay: _Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """The trainer's last flush (end_run FINISHED) waits up to 120 s for an unreachable
    server; a SIGTERM then was only noted, and the pod was SIGKILLed after its 30 s grace
    period. The trainer's SIGTERM flag is the tracker's cancel: once it is set, the flush
    waits killed_flush_timeout_s at most."""
    cancel = threading.Event()
    tracker = MlflowTracker(relay.uri, retry_s=0.5, flush_timeout_s=120.0,
                            killed_flush_timeout_s=1.0, cancel=cancel)  # fmt: skip
    run_id = tracker.start_run("end-outage")
    assert tracker.flush(30)
    relay.stop()
    tracker.log_metrics({"train_loss": 1.0}, 1)
    caplog.set_level(logging.WARNING, logger="lmcore.tracking")
    ending = threading.Thread(target=tracker.end_run, args=("FINISHED",), daemon=True)
    ending.start()
    deadline = time.monotonic() + 15
    while tracker.pending < 2 and time.monotonic() < deadline:  # the status is queued too
        time.sleep(0.01)
    cancel.set()  # the SIGTERM
    started = time.monotonic()
    ending.join(15)
    assert not ending.is_alive(), "end_run still waiting 15 s after the cancel"
    assert time.monotonic() - started < 5.0
    assert f"the run's FINISHED status included, not posted for run {run_id}" in caplog.text


def test_a_cached_version_loads_while_the_tracking_server_is_down(
    server: str, relay: _Relay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker restarting during MLflow maintenance served nothing, although the model it
    served a minute before was in its cache: even models:/NAME/1, which can never change."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = MlflowTracker(server, retry_s=0.5)
    tracker.start_run("cache-outage")
    tracker.log_model_dir(make_model_dir(tmp_path / "model"), "llm-outage", alias="candidate")
    tracker.end_run()
    cache = tmp_path / "cache"
    by_alias = resolve_model_uri("models:/llm-outage@candidate", cache, relay.uri)
    pinned = resolve_model_uri("models:/llm-outage/1", cache, relay.uri)

    relay.stop()
    caplog.set_level(logging.WARNING, logger="lmcore.model_uri")
    again = resolve_model_uri("models:/llm-outage/1", cache, relay.uri)
    assert (again.path, again.version, again.run_id) == (pinned.path, "1", pinned.run_id)
    assert "unreachable" in caplog.text and "serving models:/llm-outage/1 from the cache" \
        in caplog.text
    caplog.clear()
    again = resolve_model_uri("models:/llm-outage@candidate", cache, relay.uri)
    assert (again.path, again.version) == (by_alias.path, "1")
    assert "as version 1, the version it last resolved to here" in caplog.text
    with pytest.raises(TrackingError, match="unreachable"):  # never downloaded here
        resolve_model_uri("models:/llm-outage/2", cache, relay.uri)
    with pytest.raises(TrackingError, match="unreachable"):  # never resolved here
        resolve_model_uri("models:/llm-outage@production", cache, relay.uri)

    relay.start()  # an answer of "not found" is never covered up by the cache
    client(server).delete_registered_model_alias("llm-outage", "candidate")
    with pytest.raises(ModelNotFoundError):
        resolve_model_uri("models:/llm-outage@candidate", cache, relay.uri)


def test_tracking_uri_credentials_never_reach_params_paths_or_messages(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requests sends URL userinfo as basic auth, so `https://user:token@mlflow` works; the
    token used to land in every run's params, config.yaml and model metadata (which any
    registry reader can download), in the model cache's path the worker logs, and in errors."""
    import json
    import os as _os

    from tests.helpers.trainer_run import tiny_corpus

    secret = "s3cr3t-token"
    with_creds = server.replace("http://", f"http://alice:{secret}@")
    (tmp_path / "corpus").mkdir()
    text, data = tiny_corpus(tmp_path / "corpus", lines=1500)
    cmd = [sys.executable, "-m", "services.trainer", "model=tiny", "model.block_size=32",
           "data=text", f"data.source={text}", f"data.cache_dir={data.path.parent}",
           "train.max_steps=2", "train.batch_size=2", "train.eval_batches=2",
           "train.device=cpu", "train.progress=false", "train.quantization_report=false",
           f"train.checkpoint_dir={tmp_path / 'ckpt'}", "tracking.experiment=creds",
           f"tracking.uri={with_creds}", "tracking.register_name=llm-creds"]  # fmt: skip
    env = {**_os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "***@127.0.0.1" in done.stderr and secret not in done.stderr

    mlflow = client(server)
    version = mlflow.get_model_version("llm-creds", "1")
    run = mlflow.get_run(version.run_id)
    assert run.data.params["tracking.uri"] == server.replace("http://", "http://***@")
    assert all(secret not in v for v in run.data.params.values())
    config = Path(mlflow.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert secret not in config.read_text() and "***@127.0.0.1" in config.read_text()

    resolved = resolve_model_uri("models:/llm-creds/1", tmp_path / "cache", with_creds)
    assert secret not in str(resolved.path) and "alice" not in str(resolved.path)
    metadata = json.loads((resolved.path / "config.json").read_text())
    assert secret not in json.dumps(metadata) and "***@127.0.0.1" in json.dumps(metadata)

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    closed = f"http://alice:{secret}@127.0.0.1:{free_port()}"
    for call in (lambda: resolve_model_uri("models:/llm-creds/2", tmp_path / "c2", closed),
                 lambda: MlflowTracker(closed).start_run("creds")):
        with pytest.raises(TrackingError) as caught:
            call()
        assert secret not in str(caught.value) and "***@127.0.0.1" in str(caught.value)
