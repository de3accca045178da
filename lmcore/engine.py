"""Continuous batching: one KVCache with fixed slots; requests join, decode and leave per step.

Pure lmcore (torch and stdlib threads): it must not know about Celery, Redis or HTTP.

How a step works (`Engine.step`, also what the background thread runs):
  1. cancellations flagged since the last step finish their requests ("cancelled", text kept);
  2. a pending `swap_model` is applied once no request is active (admission pauses until then);
  3. waiting requests are admitted into the lowest free slots; those in adjacent slots share one
     prefill forward pass, and each samples its first token;
  4. one decode step runs over the range of slots from the first to the last active one
     (compiled: over all `max_batch` slots, so shapes never change). Free slots inside the range
     feed token 0 at position 0: their results are ignored and a slot's rows are rewritten by
     its next prefill. The range is a view of the cache, never a copy, and requests take the
     lowest free slot, so it stays close to the number of active requests. Each active request
     samples its next token, and a request that finishes frees its slot now, so a waiting
     request takes it at the next step.
Sampling goes through `generate.SequenceState`, so a request produces exactly what
`generate.generate_ids` produces for the same prompt and `SamplingParams` (seed included),
whatever else shares the batch.

Threads: `submit`, `cancel`, `swap_model`, `stop` and `EngineHandle` are safe from any thread.
`on_token` runs on the engine thread (or the thread calling `step`): keep it quick and do not
call step/stop/swap_model from it. An on_token that raises fails its own request only.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lmcore.cache import KVCache
from lmcore.device import host_to_device, tolist_after_queueing
from lmcore.generate import (
    Generation,
    NonFiniteLogitsError,
    SequenceState,
    TextCodec,
    Truncate,
    check_prompt_ids,
    check_truncate,
    decode_step,
    fit_prompt,
    prefill,
    sampling_vocab,
)
from lmcore.sampling import SamplingParams, clamp_ids, sample_token_ids, sample_tokens

if TYPE_CHECKING:
    from lmcore.model import Transformer

log = logging.getLogger(__name__)

# on_token's id for text released by a cancellation (held back until then), not a sampled token.
FLUSH_TOKEN_ID = -1

TokenCallback = Callable[[int, str], None]
# (model, tokens (R, 1), positions (R, 1), cache, a slice of R slots or None for all,
#  kv_len: the cache positions to read, or None for all) -> logits (R, V)
StepFn = Callable[
    ["Transformer", torch.Tensor, torch.Tensor, KVCache, "slice | None", "int | None"],
    torch.Tensor,
]


class EngineStoppedError(RuntimeError):
    """The engine was stopped: it takes no new requests or model swaps."""


@dataclass
class EngineRequest:
    """One generation request: token ids (`prompt_ids`) or text (`prompt`, needs a tokenizer).

    A text prompt is checked at submit and encoded again at admission with the tokenizer of the
    model that runs it (a request queued across a model swap uses the new vocabulary); "" starts
    from the end-of-text token, as in `generate.generate`.
    `on_token(token_id, text_delta)` is called for every token of the result's token_ids; the
    deltas concatenate to the final text. Text released as the request ends without a token of
    its own (an eos, which is not output, or a cancellation) comes as one last delta with token
    id FLUSH_TOKEN_ID.
    """

    prompt_ids: Sequence[int] = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    on_token: TokenCallback | None = None
    truncate: Truncate = "error"
    prompt: str | None = None

    def __post_init__(self) -> None:
        if self.prompt is not None and len(self.prompt_ids):
            raise ValueError("give prompt (text) or prompt_ids, not both")


@dataclass
class EngineStats:
    steps: int = 0
    decode_steps: int = 0
    prefills: int = 0
    tokens_generated: int = 0
    finished: int = 0  # completed with a Generation (cancelled ones included)
    cancelled: int = 0
    failed: int = 0
    swaps: int = 0


class EngineHandle:
    """A submitted request's future; completed exactly once, with a Generation or an error.

    Timestamps are `time.monotonic()`: submitted_at, started_at (admitted to a slot),
    first_token_at, finished_at. `metadata` is the metadata of the model that ran the request.
    """

    def __init__(self, request: EngineRequest, engine: Engine) -> None:
        self.request = request
        self.request_id = request.request_id
        self.metadata: dict[str, Any] | None = None
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._engine = engine
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._generation: Generation | None = None
        self._error: BaseException | None = None
        self._cancel_requested = False
        self._prompt_tokens = 0  # as prepared at submit (a text prompt encoded, then fitted)

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> Generation:
        """The Generation; raises the request's error, or TimeoutError if not done in time."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._generation is not None
        return self._generation

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        return self._error

    def cancel(self) -> bool:
        return self._engine.cancel(self.request_id)

    def _complete(
        self, generation: Generation | None = None, error: BaseException | None = None
    ) -> bool:
        with self._lock:
            if self._done.is_set():
                return False
            self._generation, self._error = generation, error
            self.finished_at = time.monotonic()
            self._done.set()
        return True

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"EngineHandle({self.request_id!r}, {state})"


@dataclass
class _Running:
    """A request in a slot: next_token is written at `position` by the next decode step.

    Running ahead, the next token may still be on the device (`token_on_device`): the step that
    sampled it already wrote it into the engine's step input.
    """

    handle: EngineHandle
    state: SequenceState
    slot: int
    position: int
    next_token: int = 0
    token_on_device: bool = False


@dataclass
class _QueuedStep:
    """A decode step handed to the device and not yet sampled: its logits and whom it stepped.

    `logits` row i is slot `first + i`.
    """

    logits: torch.Tensor
    runs: list[_Running]
    first: int


def _joins(group: list[tuple[EngineHandle, SequenceState, int]],
           item: tuple[EngineHandle, SequenceState, int]) -> bool:
    """Whether a request shares the group's prefill: the next slot, and padding kept under half.

    A batched prefill pads every prompt to the longest, so one long prompt among short ones
    would multiply their cost; such a request prefills in a group of its own.
    """
    lengths = [len(state.prompt_ids) for _, state, _ in group] + [len(item[1].prompt_ids)]
    adjacent = item[2] == group[-1][2] + 1
    return adjacent and len(lengths) * max(lengths) <= 2 * sum(lengths)


@dataclass
class _Swap:
    model: Transformer
    tokenizer: TextCodec | None
    metadata: dict[str, Any] | None
    events: list[threading.Event]
    cache: KVCache | None = None  # allocated before admission paused for it
    error: BaseException | None = None


class Engine:
    """Continuous batching over `max_batch` KV-cache slots of `max_len` positions each.

    Drive it with `start()` (a background thread that steps while there is work and waits on a
    condition when idle) or by calling `step()` (tests do, to control when requests arrive);
    steps are serialised either way. `compile=True` wraps the decode step in
    torch.compile(mode="reduce-overhead") (CUDA graphs; meant for GPUs). `run_ahead` (default:
    on when the model is on a GPU) keeps the next decode step queued on the device while the
    host handles the last one's tokens; off, each step waits for its tokens before the next.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: TextCodec | None = None,
        *,
        max_batch: int = 8,
        max_len: int | None = None,
        step_fn: StepFn = decode_step,
        compile: bool = False,
        run_ahead: bool | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self._max_len_arg = max_len
        self._base_step_fn = step_fn
        self._compile = compile
        self._run_ahead_arg = run_ahead
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # one step at a time, whoever drives it
        self._waiting: deque[EngineHandle] = deque()
        self._live: dict[str, EngineHandle] = {}  # waiting or running, by request id
        self._slots: list[_Running | None] = [None] * max_batch
        self._pending_swap: _Swap | None = None
        self._stats = EngineStats()
        self._thread: threading.Thread | None = None
        self._closed = False  # no more submissions
        self._stopping = False
        self._drain = True
        # The engine thread's last progress (time.monotonic()): the end of its last step, or when
        # work woke it; None while it waits idle. Read without a lock by a watchdog.
        self._progress_at: float | None = None
        self._install(model, tokenizer, metadata)

    # -- state -----------------------------------------------------------------------------------

    @property
    def model(self) -> Transformer:
        return self._model

    @property
    def tokenizer(self) -> TextCodec | None:
        return self._tokenizer

    @property
    def metadata(self) -> dict[str, Any] | None:
        return self._metadata

    @property
    def max_len(self) -> int:
        return self._cache.max_len

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        with self._lock:
            return self._has_work_locked()

    @property
    def stats(self) -> EngineStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def progress_age_s(self) -> float:
        """Seconds the engine thread has had work without finishing a step (0 while idle).

        A hung device or a deadlock makes it grow without bound. It takes no lock, so another
        thread can read it while a stuck step holds them.
        """
        since = self._progress_at
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    # -- requests --------------------------------------------------------------------------------

    def submit(self, request: EngineRequest) -> EngineHandle:
        """Queue a request; a bad one (empty, too long, ...) comes back as a failed handle."""
        handle = EngineHandle(request, self)
        with self._lock:
            if self._closed:
                raise EngineStoppedError("engine stopped: it takes no new requests")
            model, tokenizer = self._model, self._tokenizer
        try:
            # Checked now so a bad request fails at once instead of after a wait for a slot.
            handle._prompt_tokens = len(self._prepare(request, model, tokenizer))
        except Exception as exc:
            self._fail(handle, exc)
            return handle
        with self._cond:
            if self._closed:
                raise EngineStoppedError("engine stopped: it takes no new requests")
            if request.request_id in self._live:
                raise ValueError(f"request id {request.request_id!r} is already in the engine")
            self._live[request.request_id] = handle
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def cancel(self, request_id: str) -> bool:
        """Cancel a request: a waiting one finishes now, a running one before the next step.

        Returns False when the id is unknown or already finished.
        """
        with self._cond:
            handle = self._live.get(request_id)
            if handle is None or handle.done():
                return False
            queued = handle in self._waiting
            if queued:
                self._waiting.remove(handle)
                del self._live[request_id]
            else:
                handle._cancel_requested = True
                self._cond.notify_all()
        if queued:
            self._cancel_unstarted(handle)
        return True

    # -- stepping --------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration (see the module docstring); returns whether work remains."""
        with self._step_lock:
            self._bump("steps")
            self._finish_cancelled()
            self._maybe_swap()
            if self._pending_swap is None:
                self._admit()
            if not any(r is not None for r in self._slots):
                self._queued = None  # a step queued for requests that have all finished
            elif self._run_ahead:
                self._decode_ahead()
            else:
                self._decode()
            return self.has_work

    def _finish_cancelled(self) -> None:
        for run in self._running():
            if run.handle._cancel_requested:
                delta = run.state.cancel()
                if delta and not self._emit(run, FLUSH_TOKEN_ID, delta):
                    continue
                self._release(run, run.state.result())

    def _admit(self) -> None:
        """Waiting requests take the free slots; those in adjacent slots prefill together."""
        admitted: list[tuple[EngineHandle, SequenceState, int]] = []
        for slot in (i for i, r in enumerate(self._slots) if r is None):
            started = self._next_startable()
            if started is None:
                break
            admitted.append((*started, slot))
        group: list[tuple[EngineHandle, SequenceState, int]] = []
        for item in admitted:
            if group and not _joins(group, item):
                self._start(group)
                group = []
            group.append(item)
        if group:
            self._start(group)

    def _next_startable(self) -> tuple[EngineHandle, SequenceState] | None:
        """The next waiting request with its prompt prepared; bad or cancelled ones end here."""
        while True:
            with self._lock:
                if not self._waiting:
                    return None
                handle = self._waiting.popleft()
            if handle._cancel_requested:  # cancelled between the queue and its slot
                self._cancel_unstarted(handle)
                continue
            try:
                ids = self._prepare(handle.request, self._model, self._tokenizer)
                state = SequenceState(ids, handle.request.params, codec=self._tokenizer)
            except Exception as exc:
                self._fail(handle, exc)
                continue
            return handle, state

    def _start(self, group: list[tuple[EngineHandle, SequenceState, int]]) -> None:
        """Prefill requests into adjacent slots in one forward pass; each samples a first token."""
        first = group[0][2]
        prompts = [state.prompt_ids for _, state, _ in group]
        try:
            rows = slice(first, first + len(group))
            logits = prefill(self._model, prompts, self._cache, rows=rows)
        except Exception as exc:
            log.exception("prefill failed; failing its %d requests", len(group))
            for handle, _, _ in group:
                self._fail(handle, exc)
            return
        now = time.monotonic()
        runs = []
        for handle, state, slot in group:
            handle.started_at = now
            handle.metadata = self._metadata
            run = _Running(handle, state, slot, position=len(state.prompt_ids))
            self._slots[slot] = run
            self._bump("prefills")
            runs.append(run)
        self._take_tokens(runs, logits)

    def _decode(self) -> None:
        """One decode step, then one token for each active request.

        Compiled (CUDA graphs) the step covers every slot and cache position so its shapes never
        change; eager, it covers the slots from the first active one to the last and the cache
        positions up to the furthest one, so a lone short request on a wide engine costs what it
        costs alone.
        """
        running = self._running()
        device = self._model.device
        first, width, rows, kv_len = self._step_window(running)
        tokens = [0] * width
        for run in running:
            tokens[run.slot - first] = run.next_token
        logits = self._run_step(running, host_to_device(tokens, device)[:, None], first, width,
                                rows, kv_len)  # fmt: skip
        if logits is None:
            return
        out_index = host_to_device([run.slot - first for run in running], device)
        self._take_tokens(running, logits.index_select(0, out_index))

    def _decode_ahead(self) -> None:
        """One decode step whose successor is queued before the host reads its tokens.

        The tokens are sampled on the device and written straight into the step input, the next
        step is handed to the device, and only then does the host wait for the tokens (a copy of
        a few bytes) and handle them while the device computes. A request that finishes on these
        tokens wastes its row of the queued step; one that joined after a step was queued is
        left out of it and steps in the next.
        """
        queued, self._queued = self._queued, None
        stepped = self._still_running(queued.runs) if queued is not None else []
        if queued is None or not stepped:  # nothing useful in flight: step now
            queued = self._queue_step()
            if queued is None:
                return
            stepped = queued.runs
        device = self._model.device
        try:
            rows = host_to_device([run.slot - queued.first for run in stepped], device)
            tokens = sample_token_ids(queued.logits[:, : self._vocab].index_select(0, rows),
                                      [run.state.params for run in stepped],
                                      [run.state.draws for run in stepped])  # fmt: skip
            slots = host_to_device([run.slot for run in stepped], device)
            in_vocab = clamp_ids(tokens, self._vocab)
            self._step_tokens.index_copy_(0, slots, in_vocab[:, None])
        except Exception as exc:
            log.exception("sampling failed; failing its %d requests", len(stepped))
            for run in stepped:
                self._release(run, error=exc)
            return
        for run in stepped:
            run.token_on_device = True
        host_tokens, self._queued = tolist_after_queueing(tokens, self._queue_step)
        for run, token in zip(stepped, host_tokens):
            if self._slots[run.slot] is run:  # not failed by the queued step
                self._take_token(run, token)

    def _queue_step(self) -> _QueuedStep | None:
        """Hand the device a decode step for every running request (None if it failed).

        Requests whose next token is only on the host (just prefilled) write it into the step
        input first; the others' tokens are there already, sampled on the device.
        """
        running = self._running()
        device = self._model.device
        fresh = [run for run in running if not run.token_on_device]
        if fresh:
            self._step_tokens.index_copy_(0, host_to_device([run.slot for run in fresh], device),
                                          host_to_device([[run.next_token] for run in fresh],
                                                         device))  # fmt: skip
            for run in fresh:
                run.token_on_device = True
        first, width, rows, kv_len = self._step_window(running)
        tokens = self._step_tokens if rows is None else self._step_tokens[rows]
        logits = self._run_step(running, tokens, first, width, rows, kv_len)
        return None if logits is None else _QueuedStep(logits, running, first)

    def _step_window(self, running: list[_Running]) -> tuple[int, int, slice | None, int | None]:
        """The slots a step covers (first, width, rows) and the cache positions it reads."""
        if self._compile:
            return 0, self.max_batch, None, None
        first = min(run.slot for run in running)
        width = max(run.slot for run in running) + 1 - first
        kv_len = max(run.position for run in running) + 1
        return first, width, slice(first, first + width), kv_len

    def _run_step(
        self,
        running: list[_Running],
        tokens: torch.Tensor,
        first: int,
        width: int,
        rows: slice | None,
        kv_len: int | None,
    ) -> torch.Tensor | None:
        """Call the step fn at each run's position and advance them; on error fail them all."""
        positions = [0] * width  # free slots inside the window: token 0 at position 0
        for run in running:
            positions[run.slot - first] = run.position
        try:
            if self._compile:
                # Tells CUDA graphs that last step's outputs are dead and may be overwritten.
                torch.compiler.cudagraph_mark_step_begin()
            positions_in = host_to_device(positions, self._model.device)[:, None]
            logits = self._step_fn(self._model, tokens, positions_in, self._cache, rows, kv_len)
        except Exception as exc:
            log.exception("decode step failed; failing its %d requests", len(running))
            for run in running:
                self._release(run, error=exc)
            return None
        self._bump("decode_steps")
        for run in running:
            run.position += 1
        return logits

    def _still_running(self, runs: list[_Running]) -> list[_Running]:
        return [run for run in runs if self._slots[run.slot] is run]

    def _take_tokens(self, runs: list[_Running], logits: torch.Tensor) -> None:
        """Sample one token per run from its row of logits (rows in the order of runs)."""
        try:
            tokens = sample_tokens(logits[:, : self._vocab], [run.state.params for run in runs],
                                   [run.state.draws for run in runs])  # fmt: skip
        except Exception as exc:
            log.exception("sampling failed; failing its %d requests", len(runs))
            for run in runs:
                self._release(run, error=exc)
            return
        for run, token in zip(runs, tokens):
            self._take_token(run, token)

    def _take_token(self, run: _Running, token: int) -> None:
        if token >= self._vocab:  # flagged by the sampler
            self._release(run, error=NonFiniteLogitsError(
                f"the model's logits were NaN or infinite at generated token "
                f"{len(run.state.token_ids)}; the request failed, the others in its batch go on"))
            return
        before = len(run.state.token_ids)
        try:
            delta = run.state.add_token(token)
        except Exception as exc:
            self._release(run, error=exc)
            return
        if run.handle.first_token_at is None:
            run.handle.first_token_at = time.monotonic()
        self._bump("tokens_generated")
        # An eos that ends the request is not part of its output, only the text it releases.
        produced = len(run.state.token_ids) > before
        if (produced or delta) and not self._emit(run, token if produced else FLUSH_TOKEN_ID,
                                                  delta):
            return
        if run.state.finished:
            self._release(run, run.state.result())
        else:
            run.next_token = token

    def _emit(self, run: _Running, token: int, delta: str) -> bool:
        """Call the request's on_token; a callback that raises fails its own request."""
        callback = run.handle.request.on_token
        if callback is None:
            return True
        try:
            callback(token, delta)
        except Exception as exc:
            log.warning("on_token of request %s raised %r", run.handle.request_id, exc)
            self._release(run, error=exc)
            return False
        return True

    def _release(
        self,
        run: _Running,
        generation: Generation | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Free the slot now (the same step) and complete the handle."""
        self._slots[run.slot] = None
        if error is not None:
            self._fail(run.handle, error)
        else:
            assert generation is not None
            self._complete(run.handle, generation)

    def _running(self) -> list[_Running]:
        return [r for r in self._slots if r is not None]

    def _prepare(
        self, request: EngineRequest, model: Transformer, tokenizer: TextCodec | None
    ) -> list[int]:
        """The prompt ids that fit this model's window; ValueError/ContextLengthError if bad."""
        if not isinstance(request.params, SamplingParams):  # its checks are the sampler's guard
            raise ValueError(f"params must be SamplingParams, got {type(request.params).__name__}")
        check_truncate(request.truncate)
        if request.params.stop and tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        if request.prompt is not None:
            if tokenizer is None:
                raise ValueError("a text prompt needs an engine with a tokenizer; "
                                 "pass prompt_ids instead")
            ids = tokenizer.encode(request.prompt) or [tokenizer.eos_id]
        else:
            ids = [int(i) for i in request.prompt_ids]
            if not ids:
                raise ValueError("empty prompt: a request needs at least one prompt token "
                                 "(use the eos token to start)")
        check_prompt_ids(ids, model.config.vocab_size)
        return fit_prompt(ids, request.params, self._window(model), request.truncate)

    # -- completion and counters -----------------------------------------------------------------

    def _complete(self, handle: EngineHandle, generation: Generation) -> None:
        self._forget(handle)
        if handle._complete(generation):
            self._bump("finished")
            if generation.finish_reason == "cancelled":
                self._bump("cancelled")

    def _cancel_unstarted(self, handle: EngineHandle) -> None:
        self._complete(handle, Generation("", [], "cancelled", handle._prompt_tokens))

    def _fail(self, handle: EngineHandle, error: BaseException) -> None:
        self._forget(handle)
        if handle._complete(error=error):
            self._bump("failed")

    def _forget(self, handle: EngineHandle) -> None:
        """Drop a finishing request's id, before its handle completes: one that resubmits the id
        (a redelivered job) is then accepted. A live request keeps its entry when a bad request
        under the same id fails at submit."""
        with self._lock:
            if self._live.get(handle.request_id) is handle:
                del self._live[handle.request_id]

    def _bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + n)

    # -- model and hot swap ----------------------------------------------------------------------

    def _window(self, model: Transformer) -> int:
        block = model.config.block_size
        max_len = block if self._max_len_arg is None else self._max_len_arg
        if not 1 <= max_len <= block:
            raise ValueError(f"max_len must be in 1..{block} (the model's block_size), "
                             f"got {max_len}")
        return max_len

    def _new_cache(self, model: Transformer) -> KVCache:
        return KVCache.for_model(model, self.max_batch, self._window(model))

    def _install(
        self, model: Transformer, tokenizer: TextCodec | None, metadata: dict[str, Any] | None,
        cache: KVCache | None = None,
    ) -> None:  # fmt: skip
        cache = self._new_cache(model) if cache is None else cache
        step_fn: StepFn = self._base_step_fn
        if self._compile:
            step_fn = torch.compile(step_fn, mode="reduce-overhead")
        self._model, self._tokenizer, self._metadata = model, tokenizer, metadata
        self._cache, self._step_fn = cache, step_fn
        # Sampling sees logits[:, :vocab]: ids the tokenizer decodes; a sampled id at or past
        # vocab flags non-finite logits.
        self._vocab = sampling_vocab(model, tokenizer)
        run_ahead = self._run_ahead_arg
        self._run_ahead = model.device.type == "cuda" if run_ahead is None else run_ahead
        # Running ahead, each step reads its tokens from here, where the last step's sampling
        # wrote them (slot i's token in row i).
        self._step_tokens = torch.zeros(self.max_batch, 1, dtype=torch.long, device=model.device)
        self._queued: _QueuedStep | None = None

    def swap_model(
        self,
        model: Transformer,
        tokenizer: TextCodec | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        wait: bool = True,
        timeout: float | None = None,
    ) -> bool:
        """Replace model, tokenizer and metadata together, between steps.

        Admission pauses, the active requests finish on the old model, then the engine switches
        and admits again (waiting requests run on the new model). Returns whether the swap is
        done: with the thread running and wait=True it blocks until then (or timeout); when
        stepped by hand it happens at once if nothing is active, else at a later step().
        The new model's KV cache is allocated here, before admission pauses: a swap that cannot
        have one (a bad max_len for the model, no memory for it beside the serving cache) raises
        at once and never drains the batch. One that fails later leaves the old model serving
        and raises here when waited for.
        """
        with self._lock:
            if self._closed:
                raise EngineStoppedError("engine stopped: no model swaps")
        cache = self._new_cache(model)  # on the caller's thread, while the engine serves
        event = threading.Event()
        with self._cond:
            if self._closed:
                raise EngineStoppedError("engine stopped: no model swaps")
            # A newer swap replaces a pending one (its cache is dropped); its waiters are
            # released by the newer one.
            events = self._pending_swap.events if self._pending_swap else []
            swap = _Swap(model, tokenizer, metadata, [*events, event], cache)
            self._pending_swap = swap
            self._cond.notify_all()
        if not self.is_running:
            with self._step_lock:
                self._maybe_swap()
        elif wait and threading.current_thread() is not self._thread:
            event.wait(timeout)
        if event.is_set() and swap.error is not None:
            raise swap.error
        return event.is_set()

    def _maybe_swap(self) -> None:
        with self._lock:
            swap = self._pending_swap
            if swap is None or any(r is not None for r in self._slots):
                return
            self._pending_swap = None
        try:
            self._install(swap.model, swap.tokenizer, swap.metadata, swap.cache)
            self._bump("swaps")
        except Exception as exc:
            log.exception("model swap failed; keeping the old model")
            swap.error = exc
        for event in swap.events:
            event.set()

    # -- background thread -----------------------------------------------------------------------

    def start(self) -> None:
        """Run steps on a daemon thread until stop(); idempotent."""
        with self._lock:
            if self._closed:
                raise EngineStoppedError("engine stopped: create a new one")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="lmcore-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Take no new requests; drain=True finishes the accepted ones, False cancels them.

        Returns whether the engine is stopped (False if the thread outlived `timeout`).
        """
        with self._cond:
            self._closed, self._stopping, self._drain = True, True, drain
            self._cond.notify_all()
        thread = self._thread
        if thread is threading.current_thread():
            return False  # called from a callback: the loop ends after this step
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        if drain:
            while self.step():
                pass
        else:
            with self._step_lock:
                self._cancel_all()
        return True

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:  # waiters must never hang on a dead thread
            with self._lock:
                self._closed = True  # first: a submit from now on is refused, not stranded
            with self._step_lock:
                self._fail_all(exc)
            raise
        finally:
            with self._lock:
                self._closed = True
        with self._step_lock:
            self._cancel_all()  # drain=False: whatever was still accepted ends "cancelled"

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._has_work_locked():
                    self._progress_at = None  # idle: no step is due
                    self._cond.wait()
                if self._stopping and not (self._drain and self._has_work_locked()):
                    self._progress_at = None
                    return
                if self._progress_at is None:
                    self._progress_at = time.monotonic()  # work arrived: a step is due now
            try:
                self.step()
            except Exception as exc:  # fail the requests it touched, keep serving
                # (an engine bug, or the device out of memory mid-step). Waiting requests and a
                # pending swap were not in the step: they stay, and try again on the next one.
                log.exception("engine step failed")
                with self._step_lock:
                    for run in self._running():
                        self._release(run, error=exc)
            self._progress_at = time.monotonic()

    def _has_work_locked(self) -> bool:
        return bool(
            self._waiting
            or self._pending_swap is not None
            or any(r is not None for r in self._slots)
        )

    def _take_all_waiting(self) -> list[EngineHandle]:
        with self._lock:
            handles = list(self._waiting)
            self._waiting.clear()
            for handle in handles:
                self._live.pop(handle.request_id, None)
            swap, self._pending_swap = self._pending_swap, None
        if swap is not None:
            swap.error = EngineStoppedError("engine stopped before the model swap")
            for event in swap.events:
                event.set()
        return handles

    def _cancel_all(self) -> None:
        for run in self._running():
            run.handle._cancel_requested = True
        self._finish_cancelled()
        for handle in self._take_all_waiting():
            self._cancel_unstarted(handle)

    def _fail_all(self, error: BaseException) -> None:
        for run in self._running():
            self._release(run, error=error)
        for handle in self._take_all_waiting():
            self._fail(handle, error)
