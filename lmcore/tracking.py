"""Run logging to MLflow: one training run's params, metrics, artifacts and model, posted from a
background thread that rides out server outages (the registry: lmcore.registry; model URIs:
lmcore.model_uri).

Nothing the trainer calls per step may block on, or raise because of, a slow or unreachable
tracking server; mlflow is imported lazily inside functions (lmcore's import rule).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lmcore.mlflow_client import (
    MODEL_ARTIFACT,
    MODEL_CONFIG_FILE,
    ModelNotFoundError,
    TrackingError,
    _client,
    _is_not_found,
    _is_transient,
    _mlflow_uris,
    _one_line,
    _tracking_error,
    default_tracking_uri,
    redact_uri,
)
from lmcore.registry import (
    DEFAULT_MODEL_NAME,
    ModelVersionInfo,
    _delete_duplicates,
    _ensure_registered_model,
    _versions_from,
)

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "llm"
# 500 is the smallest value limit among MLflow servers still deployed (newer allow 6000); the full
# config is logged as an artifact too, so a truncated param loses nothing.
MAX_PARAM_VALUE_CHARS = 500
MAX_KEY_CHARS = 250
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_TAGS_PER_BATCH = 100
CANCEL_POLL_S = 0.1  # how often a flush looks at `cancel` (an Event cannot wake a Condition)
PIP_REQUIREMENTS = ["torch", "numpy", "tokenizers", "safetensors", "pandas"]


# -- params ---------------------------------------------------------------------------------------


def _param_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / only.
    return re.sub(r"[^\w\-. /]", "_", key)[:MAX_KEY_CHARS]


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, Sequence | Mapping):
        text = json.dumps(value, default=str, sort_keys=False)
    else:
        text = str(value)
    if len(text) > MAX_PARAM_VALUE_CHARS:
        text = text[: MAX_PARAM_VALUE_CHARS - 3] + "..."
    return text


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: nested mappings joined with ".", values as short strings."""
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name))
        else:
            flat[_param_key(name)] = _param_value(value)
    return flat


# -- mlflow plumbing ----------------------------------------------------------------------------


def _is_not_active(exc: BaseException) -> bool:
    # update_run on a deleted run: 400 "The run ... must be in the 'active' state."
    return "'active' state" in str(exc)


def _check_resumable(run: Any, tracking_uri: str) -> None:
    """A deleted run (a UI clean-up of a killed one) cannot take records: not found, for a
    resume, so the trainer starts a new run instead of failing every restart."""
    if run.info.lifecycle_stage == "deleted":
        raise ModelNotFoundError(f"cannot resume run {run.info.run_id}: it is deleted on "
                                 f"{tracking_uri}")  # fmt: skip


def _local_artifact_root(tracking_uri: str) -> str | None:
    """Beside the database for a server-less `sqlite:///` store (MLflow's default is ./mlruns in
    whatever directory the process runs in); None lets a server choose."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    return (db.parent.resolve() / "mlruns").as_uri()


# MLflow's client retries a refused connection for ~4 minutes by default (7 retries with backoff,
# 120 s timeouts): every deadline of the tracker would be minutes late. One quick retry, a
# bounded wait, and the tracker's own loops do the rest. Settings made by the user win.
TRACKER_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                         "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
_http_lock = threading.Lock()


def _bound_mlflow_http() -> None:
    """Put TRACKER_HTTP_DEFAULTS in the environment (MLflow reads it per request) unless set.

    Once, for good: setting and removing variables around each call raced with threads that
    copy the environment (torch inductor, MLflow itself): a key listed, then gone, a KeyError.
    """
    with _http_lock:
        for key, value in TRACKER_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)


# -- trackers -----------------------------------------------------------------------------------


class NullTracker:
    """A tracker that records nothing: for non-zero ranks and runs without MLflow."""

    run_id: str | None = None

    def start_run(self, *args: Any, **kwargs: Any) -> None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_model_dir(self, model_dir: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        return None

    def flush(self, timeout_s: float | None = None) -> bool:
        return True

    def end_run(self, status: str = "FINISHED") -> None:
        pass


Kind = Literal["metric", "param", "artifact", "end"]  # "end": the run's final status


def _link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


class _Outbox:
    """Records waiting to be posted, oldest first; bounded, dropping the oldest when full."""

    def __init__(self, max_pending: int) -> None:
        self.items: deque[tuple[Kind, Any]] = deque()
        self.max_pending = max_pending
        self.cond = threading.Condition()
        self.in_flight = 0
        self.dropped = 0

    def put(self, kind: Kind, records: Sequence[Any]) -> None:
        with self.cond:
            self.items.extend((kind, r) for r in records)
            while len(self.items) > self.max_pending:
                self.items.popleft()
                self.dropped += 1
            self.cond.notify_all()

    def take(self) -> list[tuple[Kind, Any]]:
        """The next batch of one kind (an artifact alone); the caller holds the lock."""
        kind = self.items[0][0]
        limit = {"metric": MAX_METRICS_PER_BATCH, "param": MAX_PARAMS_TAGS_PER_BATCH}.get(kind, 1)
        batch = []
        while self.items and self.items[0][0] == kind and len(batch) < limit:
            batch.append(self.items.popleft())
        self.in_flight = len(batch)
        return batch

    def done(self, batch: list[tuple[Kind, Any]], *, retry: bool) -> None:
        with self.cond:
            if retry:
                self.items.extendleft(reversed(batch))
            self.in_flight = 0
            self.cond.notify_all()

    @property
    def empty(self) -> bool:
        return not self.items and not self.in_flight


class MlflowTracker:
    """Logs one training run to MLflow; a background thread posts, so logging never blocks.

    Metrics, params and artifacts are queued and posted in batches; while the server is down
    the thread retries (backing off to `retry_s`) and keeps their original timestamps.

    `cancel` is set when the process must stop (the trainer's SIGTERM flag): a registration
    then gives up its retries, and a flush waits at most killed_flush_timeout_s more.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        *,
        retry_s: float = 30.0,
        max_pending: int = 200_000,
        flush_timeout_s: float = 120.0,
        killed_flush_timeout_s: float = 10.0,
        publish_timeout_s: float = 900.0,
        cancel: threading.Event | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.retry_s = retry_s
        self.flush_timeout_s = flush_timeout_s
        self.killed_flush_timeout_s = killed_flush_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self.cancel = cancel if cancel is not None else threading.Event()
        self.run_id: str | None = None
        self.last_error: str | None = None  # the latest posting failure, for logs and health
        self._outbox = _Outbox(max_pending)
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._known_params: dict[str, str] = {}
        self._staging: Path | None = None  # copies of artifacts waiting to be posted
        self._client: Any = None
        self._reopen = False  # the run was adopted while MLflow was down (start_run)

    @property
    def _tmp(self) -> Path:
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="llm-tracker-"))
        return self._staging

    @property
    def client(self) -> Any:
        if self._client is None:
            _bound_mlflow_http()  # before the first call: no call outlasts a deadline by minutes
            self._client, _ = _client(self.tracking_uri)
        return self._client

    # -- run lifecycle --------------------------------------------------------------------------

    def start_run(
        self,
        experiment: str | None = None,
        run_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        *,
        run_name: str | None = None,
    ) -> str:
        """Create a run in `experiment` (default: the constructor's), or resume `run_id`.

        The argument order is lmcore.train's Tracker protocol. Returns the run id. A new run
        raises TrackingError when the server cannot be reached: better at step 0 than never. A
        resumed run that is unknown or deleted raises ModelNotFoundError (the trainer then
        starts a new one); one the server cannot be asked about is adopted as it is, and the
        poster reopens it once the server answers.
        """
        if experiment:
            self.experiment = experiment
        offline = False
        try:
            if run_id:
                run = self.client.get_run(run_id)
                _check_resumable(run, self.tracking_uri)
                self.client.update_run(run_id, status="RUNNING")
                self._known_params = dict(run.data.params)
            else:
                experiment_id = self._experiment_id()
                run = self.client.create_run(experiment_id, run_name=run_name)
        except ModelNotFoundError:
            raise
        except Exception as exc:
            if run_id and (_is_not_found(exc) or _is_not_active(exc)):
                raise ModelNotFoundError(
                    f"cannot resume run {run_id}: not found or not active on "
                    f"{self.tracking_uri} ({_one_line(exc)})"
                ) from exc
            if not (run_id and _is_transient(exc)):
                raise _tracking_error("start the MLflow run", self.tracking_uri, exc) from exc
            # A job resumed during an outage keeps its run: failing here would fail every
            # restart until MLflow is back. The poster reopens the run when it can.
            offline = True
            self.last_error = _one_line(exc)
            log.warning("MLflow at %s unreachable (%s): resuming run %s without it; its records "
                        "are posted when it is back", redact_uri(self.tracking_uri),
                        self.last_error, run_id)  # fmt: skip
        self.run_id = run_id if offline else run.info.run_id
        self._reopen = offline
        self._closing = threading.Event()  # this run's poster's own: an old one never revives
        self._thread = threading.Thread(target=self._post_loop, args=(self._closing,),
                                        name="mlflow-poster", daemon=True)  # fmt: skip
        self._thread.start()
        if params:
            self.log_params(params)
        log.info("MLflow run %s (%s, experiment %r)", self.run_id, redact_uri(self.tracking_uri),
                 self.experiment)  # fmt: skip
        return self.run_id

    def _reopen_run(self) -> None:
        """Poster thread: reattach to a run adopted while MLflow was down (see start_run).

        Queued params the run already holds are dropped, changed ones become `resumed.*` tags;
        a run deleted meanwhile is replaced by a new one in the experiment.
        """
        from mlflow.entities import Param, RunTag

        run_id = self.run_id
        try:
            run = self.client.get_run(run_id)
            _check_resumable(run, self.tracking_uri)
            self.client.update_run(run_id, status="RUNNING")
            known = dict(run.data.params)
        except Exception as exc:
            if _is_transient(exc):
                raise
            log.warning("cannot reopen MLflow run %s (%s); logging into a new run", run_id,
                        _one_line(exc))  # fmt: skip
            run = self.client.create_run(self._experiment_id())
            self.run_id, known = run.info.run_id, {}
        with self._outbox.cond:
            kept: deque[tuple[Kind, Any]] = deque()
            for kind, record in self._outbox.items:
                if kind == "param" and isinstance(record, Param) and record.key in known:
                    if known[record.key] == record.value:
                        continue
                    record = RunTag(_param_key(f"resumed.{record.key}"), record.value)
                elif kind == "param" and isinstance(record, Param):
                    known[record.key] = record.value
                kept.append((kind, record))
            self._outbox.items = kept
            self._known_params = known
            self._reopen = False
        log.info("MLflow reachable again; run %s reopened", self.run_id)

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return str(self.client.create_experiment(
                    self.experiment, artifact_location=_local_artifact_root(self.tracking_uri)
                ))  # fmt: skip
            except MlflowException:  # created meanwhile by another process
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {self.experiment!r} is deleted; restore it first")
        return str(found.experiment_id)

    def end_run(self, status: str = "FINISHED") -> None:
        """Close the run after everything queued before it, waiting at most flush_timeout_s,
        and at most killed_flush_timeout_s for a KILLED run or once `cancel` is set (the
        trainer's SIGTERM path: a pod's grace period is 30 s by default, and the checkpoint was
        saved before this).

        The final status is posted by the poster thread like any record, so an outage costs
        this call its flush timeout and no more.
        """
        if self.run_id is None or self._thread is None:
            return
        wait_s = self.flush_timeout_s
        if status == "KILLED":
            wait_s = min(wait_s, self.killed_flush_timeout_s)
        self._outbox.put("end", [status])
        if not self.flush(wait_s):
            log.warning("MLflow unreachable: %d tracking records, the run's %s status included, "
                        "not posted for run %s (%s)", self.pending, status, self.run_id,
                        self.last_error or "no answer yet")  # fmt: skip
        if self._outbox.dropped:
            log.warning("%d oldest tracking records were dropped during a long MLflow outage",
                        self._outbox.dropped)  # fmt: skip
        self._closing.set()
        with self._outbox.cond:
            self._outbox.cond.notify_all()
        # The flush has waited already: the poster is idle, or inside a call that it is left
        # to finish alone (a daemon thread).
        self._thread.join(timeout=0.5)
        self._thread = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued record is posted; False if `timeout_s` passed first, or
        killed_flush_timeout_s after `cancel` was set."""
        deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
        cancelled = False
        with self._outbox.cond:
            while not self._outbox.empty:
                if not cancelled and self.cancel.is_set():
                    cancelled = True
                    deadline = min(deadline, time.monotonic() + self.killed_flush_timeout_s)
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._outbox.cond.wait(min(left, CANCEL_POLL_S))
        return True

    @property
    def pending(self) -> int:
        with self._outbox.cond:
            return len(self._outbox.items) + self._outbox.in_flight

    # -- logging (never raises) -----------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flattened ("a.b.c") params; on a resumed run a changed value becomes a tag instead."""
        try:
            from mlflow.entities import Param, RunTag

            with self._outbox.cond:  # the poster's reopen (start_run) rewrites these too
                records: list[Any] = []
                for key, value in flatten_params(params).items():
                    old = self._known_params.get(key)
                    if old == value:
                        continue
                    if old is None:
                        records.append(Param(key, value))
                        self._known_params[key] = value
                    else:  # MLflow params are immutable: keep the new value where it can go
                        records.append(RunTag(_param_key(f"resumed.{key}"), value))
                self._put("param", records)
        except Exception as exc:  # logging must not stop training
            log.warning("could not queue params: %s", _one_line(exc))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        try:
            from mlflow.entities import Metric

            now_ms = int(time.time() * 1000)
            records = []
            for key, value in metrics.items():
                if value is None:
                    continue
                number = float(value)  # accepts 0-d tensors and numpy scalars
                records.append(Metric(_param_key(key), number, now_ms, int(step)))
            self._put("metric", records)
        except Exception as exc:
            log.warning("could not queue metrics at step %s: %s", step, _one_line(exc))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file or a directory's contents, in the background.

        A staged copy (hard links where possible) is what gets posted, so the caller may delete
        or rewrite `path` at once, as a TemporaryDirectory does.
        """
        if not self._accepting("artifact"):
            return
        try:
            staged = self._stage(Path(path))
        except Exception as exc:
            log.warning("could not log artifact %s: %s", path, _one_line(exc))
            return
        self._put("artifact", [(str(staged), artifact_path)])

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write `text` to `artifact_file` (e.g. "config.yaml") in the run's artifacts."""
        local = self._tmp / secrets.token_hex(4) / Path(artifact_file).name
        local.parent.mkdir(parents=True)
        local.write_text(text, encoding="utf-8")
        parent = str(Path(artifact_file).parent)
        self._put("artifact", [(str(local), None if parent == "." else parent)])

    def _stage(self, source: Path) -> Path:
        target = self._tmp / secrets.token_hex(4) / source.name
        target.parent.mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, target)
        return target

    def _accepting(self, kind: Kind) -> bool:
        if self.run_id is None or self._thread is None:
            log.warning("MLflow tracker: %s logged outside start_run/end_run; ignored", kind)
            return False
        return True

    def _put(self, kind: Kind, records: Sequence[Any]) -> None:
        if records and self._accepting(kind):
            self._outbox.put(kind, records)

    # -- the poster thread ----------------------------------------------------------------------

    def _post_loop(self, closing: threading.Event) -> None:
        failures = 0
        box = self._outbox
        while True:
            with box.cond:
                box.cond.wait_for(lambda: box.items or closing.is_set())
                if not box.items:
                    return
                reopen = self._reopen
                batch = [] if reopen else box.take()
            try:
                if reopen:
                    self._reopen_run()  # rewrites the queued params; then post as usual
                    continue
                self._post(batch)
            except Exception as exc:
                if _is_transient(exc) and not closing.is_set():
                    failures += 1
                    self._note_failure(exc, failures)
                    box.done(batch, retry=True)
                    closing.wait(min(self.retry_s, 0.5 * 2 ** min(failures, 8)))
                    continue
                if reopen:
                    self._reopen = False  # posting will tell, record by record
                    log.warning("cannot reopen MLflow run %s: %s", self.run_id, _one_line(exc))
                    continue
                if batch[0][0] == "end":
                    log.warning("could not mark MLflow run %s %s: %s", self.run_id, batch[0][1],
                                _one_line(exc))  # fmt: skip
                else:
                    log.warning("MLflow %s %d %s record(s), dropped: %s",
                                "unreachable," if _is_transient(exc) else "refused", len(batch),
                                batch[0][0], _one_line(exc))  # fmt: skip
            if failures:
                log.info("MLflow reachable again; posting queued records")
                failures = 0
            box.done(batch, retry=False)

    def _note_failure(self, exc: BaseException, failures: int) -> None:
        self.last_error = _one_line(exc)
        if failures == 1:
            log.warning("MLflow unreachable, will keep retrying (%d queued): %s",
                        len(self._outbox.items), self.last_error)  # fmt: skip

    def _post(self, batch: list[tuple[Kind, Any]]) -> None:
        from mlflow.entities import Param

        kind = batch[0][0]
        records = [r for _, r in batch]
        if kind == "end":
            self.client.set_terminated(self.run_id, records[0])
        elif kind == "metric":
            self.client.log_batch(self.run_id, metrics=records)
        elif kind == "param":
            params = [r for r in records if isinstance(r, Param)]
            tags = [r for r in records if not isinstance(r, Param)]
            self.client.log_batch(self.run_id, params=params, tags=tags)
        else:
            local, artifact_path = records[0]
            if Path(local).is_dir():
                self.client.log_artifacts(self.run_id, local, artifact_path)
            elif Path(local).is_file():
                self.client.log_artifact(self.run_id, local, artifact_path)
            else:
                raise FileNotFoundError(f"artifact {local} no longer exists")
            shutil.rmtree(Path(local).parent, ignore_errors=True)  # the staging dir

    # -- the model ------------------------------------------------------------------------------

    def log_model_dir(
        self,
        model_dir: str | os.PathLike[str],
        register_name: str | None = DEFAULT_MODEL_NAME,
        alias: str | None = "candidate",
    ) -> ModelVersionInfo:
        """Log the model dir as the run's pyfunc `model`, register a version, point `alias` at it.

        Synchronous: each step is retried while the server is unreachable, for up to
        publish_timeout_s or until `cancel` is set; then TrackingError (the model dir itself
        is already on disk).
        """
        if self.run_id is None:
            raise TrackingError("log_model_dir needs a started run")
        source = Path(model_dir)
        if not (source / MODEL_CONFIG_FILE).is_file():
            raise ModelNotFoundError(f"{source} is not a model dir (no {MODEL_CONFIG_FILE})")
        deadline = time.monotonic() + self.publish_timeout_s
        step = lambda action, fn: self._retrying(action, fn, deadline)  # noqa: E731
        model_id = self._log_pyfunc(source, step)
        if not register_name:
            run_uri = f"runs:/{self.run_id}/{MODEL_ARTIFACT}"
            return ModelVersionInfo(None, None, self.run_id, run_uri)
        step("register the model", lambda: _ensure_registered_model(self.client, register_name))
        registered_from = f"models:/{model_id}"  # a logged model made by this call alone
        attempts = 0

        def create_version() -> Any:
            nonlocal attempts
            attempts += 1
            if attempts > 1:  # the server may have created it and the answer been lost
                found = _versions_from(self.client, register_name, self.run_id, registered_from)
                if found:
                    return found[0]
            # A local (sqlite) registry resolves the models:/ source through the process-wide
            # tracking URI, so point it at this tracker's store for the call.
            with _mlflow_uris(self.tracking_uri):
                return self.client.create_model_version(
                    register_name, source=registered_from, run_id=self.run_id,
                    model_id=model_id)  # fmt: skip

        mv = step("create a model version", create_version)
        # MLflow's HTTP client also retries a POST within one call, so a lost answer there leaves
        # a second version of the same source: keep the first, delete the rest.
        versions = step("check the new version", lambda: _versions_from(
            self.client, register_name, self.run_id, registered_from))
        if versions:
            mv = versions[0]
            _delete_duplicates(self.client, versions[1:])
        version = str(mv.version)
        if alias:
            step("set the alias", lambda: self.client.set_registered_model_alias(
                register_name, alias, version))
        self._put("param", [_run_tag("llm.model_version", f"{register_name}/{version}")])
        log.info("registered %s version %s (alias %s)", register_name, version, alias)
        uri = f"models:/{register_name}/{version}"
        return ModelVersionInfo(register_name, version, self.run_id, uri)

    def _retrying(self, action: str, fn: Any, deadline: float) -> Any:
        delay = 0.5
        while True:
            if self.cancel.is_set():
                raise TrackingError(f"cannot {action}: the process is stopping (cancelled)")
            try:
                return fn()
            except Exception as exc:
                if not _is_transient(exc) or time.monotonic() + delay > deadline:
                    raise _tracking_error(action, self.tracking_uri, exc) from exc
                log.warning("cannot %s yet, retrying in %.0f s: %s", action, delay, _one_line(exc))
            self.cancel.wait(delay)
            delay = min(delay * 2, self.retry_s)

    def _log_pyfunc(self, model_dir: Path, step: Any) -> str:
        import mlflow.pyfunc
        from mlflow.models import Model

        from lmcore import mlflow_pyfunc

        # From this module's file: lmcore.__file__ is None when imported as a namespace package.
        lmcore_dir = Path(mlflow_pyfunc.__file__).resolve().parent

        run = step("read the run", lambda: self.client.get_run(self.run_id))
        # Created here so the logged model lands in the run's experiment, not the default one.
        logged = step("create the logged model", lambda: self.client.create_logged_model(
            run.info.experiment_id, name=MODEL_ARTIFACT, source_run_id=self.run_id))
        # Linked here, not by Model.log: its link is an insert that fails (UNIQUE) when repeated,
        # so a retried upload whose first attempt got that far could never succeed.
        step("link the model to the run", lambda: self._link_output(logged.model_id))

        def upload() -> None:
            with _mlflow_uris(self.tracking_uri), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*input example.*")
                Model.log(
                    artifact_path=None,
                    flavor=mlflow.pyfunc,
                    name=MODEL_ARTIFACT,
                    run_id=None,  # no second link (see above); the logged model names the run
                    model_id=logged.model_id,  # a retry re-uploads into the same logged model
                    # "Model from code": MLflow runs this file to load; nothing is pickled.
                    python_model=mlflow_pyfunc.__file__,
                    artifacts={mlflow_pyfunc.MODEL_DIR_ARTIFACT: str(model_dir)},
                    code_paths=[str(lmcore_dir)],  # self-contained for `mlflow models serve`
                    signature=mlflow_pyfunc.signature(),
                    pip_requirements=PIP_REQUIREMENTS,
                )

        step("upload the model", upload)
        return str(logged.model_id)

    def _link_output(self, model_id: str) -> None:
        """Record the logged model as the run's output, once, even if a reply is lost."""
        from mlflow.entities import LoggedModelOutput

        def linked() -> bool:
            outputs = self.client.get_run(self.run_id).outputs
            return any(o.model_id == model_id for o in (outputs.model_outputs if outputs else []))

        if linked():
            return
        try:
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model_id, step=0)])
        except Exception:
            if not linked():  # else the server did it and its answer was lost
                raise


def _run_tag(key: str, value: str) -> Any:
    from mlflow.entities import RunTag

    return RunTag(key, value)
