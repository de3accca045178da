"""One worker process's serving state: the model, lmcore's engine thread, heartbeat and hot swap.

Created once per process (Celery's celeryd_after_setup) and shared by the task threads; it must
not run jobs itself (tasks.py does) and must never be created before a fork.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from lmcore.engine import Engine, EngineRequest
from lmcore.generate import SamplingParams
from services.common import keys, lua_scripts
from services.common.settings import Settings
from services.worker.job_supervisor import JobStreamer
from services.worker.loader import (
    ServingModel,
    alias_of,
    cannot_fix_itself,
    load_serving_model,
    tidy_model_cache,
)

log = logging.getLogger(__name__)


RETRY_REFUSED_MAX_S = 3600.0  # the longest wait before a version that may load later is tried
# After a stall: how long Celery's warm shutdown may take (the task threads hand their jobs back
# within a second) before the process exits hard.
STALL_EXIT_S = 30.0


class EngineStalledError(RuntimeError):
    """This worker's engine stalled: the job goes back to the queue for another worker."""


@dataclass
class RefusedVersion:
    """A version the alias named that this worker could not load or swap in.

    Not tried again until the alias moves, or, where the failure may pass (the registry away
    mid-download, no memory beside the serving model), at `retry_at`, backing off each time.
    """

    version: str
    error: str
    at: float  # Unix time of the last try
    tries: int = 1
    retry_at: float | None = None  # time.monotonic(); None: only once the alias moves

    def due(self) -> bool:
        return self.retry_at is not None and time.monotonic() >= self.retry_at

    def report(self) -> dict[str, Any]:
        retry_in = None if self.retry_at is None else max(0.0, self.retry_at - time.monotonic())
        return {"version": self.version, "error": self.error, "at": self.at,
                "tries": self.tries, "retry_in_s": retry_in}  # fmt: skip


def make_redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), retries=3),
    )


def _shut_this_worker_down() -> None:
    """SIGTERM to this process: Celery's warm shutdown, then the orchestrator starts a new one."""
    os.kill(os.getpid(), signal.SIGTERM)


def exit_now() -> None:
    """End the process at once, whatever its threads do: a step stuck in native code (a hung
    kernel) can hold an ordinary exit (joining threads, CUDA's teardown) forever."""
    logging.shutdown()  # flush the log handlers first
    os._exit(1)


def _shut_this_stalled_worker_down() -> None:
    """Celery's warm shutdown (no new jobs; the task threads hand theirs back), and a hard exit
    if that has not ended the process within STALL_EXIT_S."""
    timer = threading.Timer(STALL_EXIT_S, exit_now)
    timer.daemon = True
    timer.start()
    _shut_this_worker_down()


class WorkerRuntime:
    def __init__(
        self, settings: Settings, nodename: str,
        on_engine_death: Callable[[], None] = _shut_this_worker_down,
        on_engine_stall: Callable[[], None] = _shut_this_stalled_worker_down,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.nodename = nodename
        self.on_engine_death = on_engine_death
        self.on_engine_stall = on_engine_stall
        # Set when the engine stalled: task threads give their jobs back instead of waiting.
        self.stalled = threading.Event()
        self.redis = make_redis(settings)
        self.claim = self.redis.register_script(lua_scripts.CLAIM)
        self.renew = self.redis.register_script(lua_scripts.RENEW)
        self.finish = self.redis.register_script(lua_scripts.FINISH)
        self.serving: ServingModel | None = None
        self.engine: Engine | None = None
        self.streamer = JobStreamer(
            self.redis, self.renew, settings.lease_ttl_s, settings.job_ttl_s
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._swap_lock = threading.Lock()
        self.refused: RefusedVersion | None = None  # the alias's version that failed to serve

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model (retrying until it can), start the engine, heartbeat and watcher."""
        serving = self._load_with_retry(self.settings.model_uri)
        self.serving = serving
        compiled = self.settings.decode_compiled_on(serving.model.device.type)
        self.engine = self._start_engine(serving, compiled)
        if compiled and not self._warm_up(self.engine):
            log.error("serving with an eager decode step instead")
            self.engine.stop(drain=False)
            self.engine = self._start_engine(serving, compiled=False)
        self.streamer.start()
        self._spawn("heartbeat", self._heartbeat_loop)
        alias = alias_of(self.settings.model_uri)
        if alias:
            self._spawn("model-watcher", lambda: self._watch_alias(alias.name, alias.alias))

    def _start_engine(self, serving: ServingModel, compiled: bool) -> Engine:
        engine = Engine(
            serving.model, serving.tokenizer, max_batch=self.settings.max_batch,
            compile=compiled, metadata=serving.ref.model_dump(),
        )  # fmt: skip
        engine.start()
        return engine

    @staticmethod
    def _warm_up(engine: Engine) -> bool:
        """Compile and record the decode step now, not while the first job waits for it.

        Returns False if it failed (say, no compiler in the image). A hot swap to a model of the
        same shapes reuses the compiled step (no new graph: tests/unit/test_engine.py); on a GPU
        the CUDA graphs then record the new weights' addresses at its first step.
        """
        start = time.monotonic()
        warm = SamplingParams(max_new_tokens=2, temperature=0.0, eos=False)
        error = engine.submit(EngineRequest([0], warm, request_id="warm-up")).exception()
        if error is not None:
            log.error("compiling the decode step failed: %r", error)
            return False
        log.info("compiled the decode step in %.1f s", time.monotonic() - start)
        return True

    def stop(self, timeout_s: float = 30.0) -> None:
        """Called after Celery's pool has finished its tasks: stop threads, engine, heartbeat."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        if self.engine is not None:  # a stalled one never finishes its step: no wait for it
            stalled = self.stalled.is_set()
            self.engine.stop(drain=not stalled, timeout=0 if stalled else timeout_s)
        self.streamer.stop()
        try:
            self._forget_heartbeat()
        except redis.RedisError:
            pass
        self.redis.close()

    def _spawn(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _load_with_retry(self, uri: str) -> ServingModel:
        delay = 2.0
        while True:
            try:
                return load_serving_model(uri, self.settings)
            except Exception as exc:  # MLflow not up yet, no version registered yet, ...
                if cannot_fix_itself(uri, exc):
                    log.critical("cannot load model %s: %s; retrying cannot fix this, the worker "
                                 "exits", uri, exc)  # fmt: skip
                    # SystemExit: Celery logs and ignores an exception from its startup signal.
                    raise SystemExit(f"cannot load model {uri}: {exc}") from exc
                log.error("cannot load model %s: %s; retrying in %.0f s", uri, exc, delay)
                if self._stop.wait(delay):
                    raise
                delay = min(delay * 2, 30.0)

    # -- heartbeat (for /readyz and the healthcheck) and the served model's limits ---------------

    def heartbeat(self) -> None:
        engine, serving = self.engine, self.serving
        assert engine is not None and serving is not None
        payload = {
            "nodename": self.nodename,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "model": serving.ref.model_dump(),
            "active": engine.active,
            "waiting": engine.waiting,
            "max_batch": engine.max_batch,
            "progress_age_s": round(engine.progress_age_s, 3),  # the probe checks it too
            "ts": time.time(),
        }
        refused = self.refused
        if refused is not None:  # the version its alias names, which this worker does not serve
            payload["refused_model"] = refused.report()
        digest = serving.tokenizer_digest
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.worker(self.nodename), json.dumps(payload), ex=self.settings.heartbeat_ttl_s)
        pipe.zadd(keys.WORKERS, {self.nodename: payload["ts"]})
        # The API checks prompt lengths against these (it never loads weights).
        pipe.hset(keys.MODEL_CURRENT, mapping={
            **{k: v for k, v in serving.ref.model_dump().items() if v is not None},
            "block_size": str(engine.max_len),
            "tokenizer": digest,
        })  # fmt: skip
        pipe.exists(keys.tokenizer(digest))
        *_, has_tokenizer = pipe.execute()
        if not has_tokenizer:
            self.redis.set(keys.tokenizer(digest), serving.tokenizer.to_str())

    def _heartbeat_loop(self) -> None:
        while True:
            engine = self.engine
            if engine is not None and not self._stop.is_set():
                if not engine.is_running:
                    self._engine_died()
                    return
                if engine.progress_age_s > self.settings.engine_stall_s:
                    self._engine_stalled(engine.progress_age_s)
                    return
            try:
                self.heartbeat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            if self._stop.wait(self.settings.heartbeat_s):
                return

    def _engine_died(self) -> None:
        """The engine thread ended on its own: this worker can run no job. Stop beating, so
        /readyz and the probe stop counting it at once, and shut the process down."""
        log.critical("the engine thread stopped; this worker takes no more jobs and shuts down")
        try:
            self._forget_heartbeat()
        except redis.RedisError:
            pass
        self.on_engine_death()

    def _engine_stalled(self, age_s: float) -> None:
        """The engine has had work but finished no step for longer than LLM_ENGINE_STALL_S (a
        hung kernel or device, a deadlock): treated as dead. Stop beating, shut down (the task
        threads hand their jobs back to the queue for a healthy worker) and exit."""
        log.error("engine stalled: no step finished for %.0f s with work waiting (over "
                  "LLM_ENGINE_STALL_S=%g s); a hung device or a deadlock? This worker hands its "
                  "jobs back and exits", age_s, self.settings.engine_stall_s)  # fmt: skip
        try:
            self._forget_heartbeat()
        except redis.RedisError:
            pass
        self.on_engine_stall()  # first: the consumer stops before the jobs go back to the queue
        self.stalled.set()

    def _forget_heartbeat(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(keys.worker(self.nodename))
        pipe.zrem(keys.WORKERS, self.nodename)
        pipe.execute()

    # -- hot swap -------------------------------------------------------------------------------

    def _watch_alias(self, name: str, alias: str) -> None:
        while not self._stop.wait(self.settings.model_poll_s):
            try:
                self.check_alias(name, alias)
            except Exception as exc:  # the registry being down must not stop serving
                log.warning("model alias check failed: %s", exc)

    def check_alias(self, name: str, alias: str) -> None:
        """One poll: swap to the version `name@alias` names, unless it is the one serving or
        one that already failed here (until the alias moves, or its retry is due)."""
        from lmcore.registry import current_version

        info = current_version(name, alias, self.settings.mlflow_tracking_uri)
        serving, refused = self.serving, self.refused
        if info is None or serving is None:
            return
        if info.version == serving.ref.version:
            self.refused = None  # the alias came back to what serves
            return
        if refused is not None and refused.version == info.version and not refused.due():
            log.debug("%s@%s names version %s, which failed here (%s); serving %s", name,
                      alias, info.version, refused.error, serving.ref.version)  # fmt: skip
            return
        log.info("%s@%s moved %s -> %s", name, alias, serving.ref.version, info.version)
        uri = f"models:/{name}/{info.version}"
        try:
            self.swap_to(uri, alias_uri=self.settings.model_uri)
        except Exception as exc:
            self._refuse(name, alias, info.version, uri, exc)
            return
        self.refused = None

    def _refuse(self, name: str, alias: str, version: str, uri: str, exc: Exception) -> None:
        """Remember a version that failed to load or swap in, so that the next polls do not load
        it again beside the serving model (and pause admission) only to fail the same way."""
        before = self.refused
        tries = before.tries + 1 if before is not None and before.version == version else 1
        error = f"{type(exc).__name__}: {exc}"[:500]
        retry_at = None
        if not cannot_fix_itself(uri, exc):  # may load later: back off, doubling each time
            delay = min(self.settings.model_poll_s * 2 ** tries, RETRY_REFUSED_MAX_S)
            retry_at = time.monotonic() + delay
        self.refused = RefusedVersion(version, error, time.time(), tries, retry_at)
        serving = self.serving
        log.error("cannot serve %s@%s version %s (%s); serving version %s %s", name, alias,
                  version, error, serving.ref.version if serving else None,
                  "until the alias moves" if retry_at is None else
                  f"and trying it again in {retry_at - time.monotonic():.0f} s")  # fmt: skip
        try:
            self.heartbeat()
        except redis.RedisError:
            pass

    def swap_to(self, uri: str, alias_uri: str | None = None) -> None:
        """Load `uri` beside the serving model, then switch the engine between steps."""
        with self._swap_lock:
            old = self.serving
            new = load_serving_model(uri, self.settings, layout=old.layout if old else None)
            if alias_uri:
                new.ref.uri = alias_uri
            assert self.engine is not None
            self.engine.swap_model(new.model, new.tokenizer, new.ref.model_dump())
            self.serving = new
            log.info("now serving %s version %s", new.ref.name, new.ref.version)
        try:
            self.heartbeat()
        except redis.RedisError:
            pass
        with self._swap_lock:  # a swap since then keeps its own model and the one it replaced
            if self.serving is new:
                tidy_model_cache(self.settings, new, old, alias_uri)


_runtime: WorkerRuntime | None = None


def get_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("worker runtime not started (is this a Celery worker process?)")
    return _runtime


def set_runtime(runtime: WorkerRuntime | None) -> None:
    global _runtime
    _runtime = runtime
