"""Continuous-batching engine: requests that share slots generate what they generate alone."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import types

import pytest
import torch

from lmcore import engine as engine_module
from lmcore.engine import (
    FLUSH_TOKEN_ID,
    Engine,
    EngineHandle,
    EngineRequest,
    EngineStoppedError,
)
from lmcore.generate import (
    ContextLengthError,
    Generation,
    NonFiniteLogitsError,
    SamplingParams,
    decode_step,
    generate,
    generate_ids,
)
from lmcore.model import Transformer
from tests.helpers.models import context_sensitive_model
from tests.helpers.services import wait_until

pytestmark = pytest.mark.unit

WAIT_S = 30.0  # generous: the machine is shared; a hang still fails the test
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.9, seed=1234)
PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [42], [300, 200, 100, 50]]


@pytest.fixture(scope="module")
def model() -> Transformer:
    return context_sensitive_model(0)


@pytest.fixture(scope="module")
def other_model() -> Transformer:
    return context_sensitive_model(1)


@pytest.fixture(scope="module")
def text_setup():
    tokenizer_mod = pytest.importorskip("lmcore.tokenizer")
    corpus = ["the quick brown fox jumps over the lazy dog. "
              "héllo wörld, ça va? 日本語 テキスト"] * 20  # fmt: skip
    tok = tokenizer_mod.Tokenizer.train(corpus, vocab_size=300)
    return context_sensitive_model(0, vocab_size=tok.vocab_size), tok


@pytest.fixture(params=[False, True], ids=["step-by-step", "run-ahead"])
def run_ahead(request) -> bool:
    """Both ways of stepping (the run-ahead default is for GPUs; here it runs on the CPU)."""
    return request.param


def alone(model: Transformer, prompt: list[int], params: SamplingParams, **kw):
    return generate_ids(model, [prompt], params, **kw)[0]


def run_until_idle(engine: Engine, max_steps: int = 500) -> int:
    for n in range(1, max_steps + 1):
        if not engine.step():
            return n
    raise AssertionError("engine still busy after max_steps")


def run_alone_recording_tokens(
    engine: Engine, prompt: str, params: SamplingParams
) -> tuple[Generation, list[tuple[int, str]]]:
    """One request run to the end: its result and every (token id, text delta) on_token saw."""
    seen: list[tuple[int, str]] = []
    handle = engine.submit(EngineRequest(prompt=prompt, params=params,
                                         on_token=lambda t, d: seen.append((t, d))))
    run_until_idle(engine)
    return handle.result(0), seen


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_requests_joining_at_different_steps_generate_what_each_generates_alone(
    model, params, run_ahead
):
    engine = Engine(model, max_batch=3, run_ahead=run_ahead)
    handles = []
    for i, prompt in enumerate(PROMPTS):
        # Different lengths too, so requests finish at different steps and slots get reused.
        p = dataclasses.replace(params, max_new_tokens=params.max_new_tokens + i)
        handles.append((engine.submit(EngineRequest(prompt, p)), prompt, p))
        for _ in range(i + 1):
            engine.step()
    run_until_idle(engine)
    for handle, prompt, p in handles:
        got, want = handle.result(0), alone(model, prompt, p)
        assert got.token_ids == want.token_ids
        assert got.finish_reason == want.finish_reason == "length"
        assert got.prompt_tokens == len(prompt)


def test_cancelling_a_running_request_frees_its_slot_and_leaves_the_others_unchanged(
    model, run_ahead
):
    engine = Engine(model, max_batch=3, run_ahead=run_ahead)
    params = [GREEDY, SAMPLED, SamplingParams(max_new_tokens=10, temperature=0.8, seed=5)]
    handles = [engine.submit(EngineRequest(p, sp)) for p, sp in zip(PROMPTS, params)]
    late = engine.submit(EngineRequest(PROMPTS[3], SAMPLED))
    for _ in range(3):
        engine.step()
    assert engine.active == 3 and engine.waiting == 1
    assert handles[1].cancel() is True
    engine.step()
    # Cancelled before the step, its slot went to the waiting request in that same step.
    cancelled = handles[1].result(0)
    assert cancelled.finish_reason == "cancelled"
    full = alone(model, PROMPTS[1], SAMPLED)
    assert 0 < len(cancelled.token_ids) < len(full.token_ids)
    assert cancelled.token_ids == full.token_ids[: len(cancelled.token_ids)]
    assert engine.waiting == 0 and late.started_at is not None
    assert handles[1].cancel() is False  # already finished
    run_until_idle(engine)
    for handle, prompt, sp in [*zip(handles, PROMPTS, params), (late, PROMPTS[3], SAMPLED)]:
        if handle is handles[1]:
            continue
        assert handle.result(0).token_ids == alone(model, prompt, sp).token_ids
    assert engine.stats.cancelled == 1


def test_cancelling_a_waiting_request_finishes_it_before_it_runs(model, run_ahead):
    engine = Engine(model, max_batch=1, run_ahead=run_ahead)
    seen: list[int] = []
    first = engine.submit(EngineRequest([1, 2], GREEDY))
    queued = engine.submit(EngineRequest([3, 4], GREEDY, on_token=lambda t, d: seen.append(t)))
    engine.step()
    assert engine.cancel(queued.request_id) is True
    assert queued.done() and engine.waiting == 0
    result = queued.result(0)
    assert (result.finish_reason, result.token_ids, seen) == ("cancelled", [], [])
    run_until_idle(engine)
    assert first.result(0).token_ids == alone(model, [1, 2], GREEDY).token_ids
    assert engine.stats.prefills == 1
    assert engine.cancel("no-such-request") is False


def test_a_text_request_cancelled_while_queued_reports_its_prompt_tokens(text_setup):
    model, tok = text_setup
    engine = Engine(model, tok, max_batch=1)
    running = engine.submit(EngineRequest(prompt="the quick", params=GREEDY))
    queued = engine.submit(EngineRequest(prompt="héllo wörld", params=GREEDY))
    never_started = engine.submit(EngineRequest(prompt="the lazy dog", params=GREEDY))
    engine.step()
    queued.cancel()
    engine.stop(drain=False)  # cancels the running request and the one still queued
    assert running.result(0).prompt_tokens == len(tok.encode("the quick"))
    assert queued.result(0).prompt_tokens == len(tok.encode("héllo wörld"))
    assert never_started.result(0).prompt_tokens == len(tok.encode("the lazy dog"))


def test_more_requests_than_slots_queue_and_all_finish(model, run_ahead):
    engine = Engine(model, max_batch=2, run_ahead=run_ahead)
    prompts = [[i + 1, i + 2] for i in range(5)]
    handles = [engine.submit(EngineRequest(p, SAMPLED)) for p in prompts]
    most_active = 0
    while engine.step():
        most_active = max(most_active, engine.active)
    assert most_active == 2
    for handle, prompt in zip(handles, prompts):
        assert handle.result(0).token_ids == alone(model, prompt, SAMPLED).token_ids
    assert engine.stats.finished == 5 and engine.stats.prefills == 5


def test_a_finished_request_frees_its_slot_the_same_step(model, run_ahead):
    engine = Engine(model, max_batch=1, run_ahead=run_ahead)
    # Step 1 samples tokens 1 (prefill) and 2 (decode); step 2 samples token 3 and finishes.
    first = engine.submit(EngineRequest([5, 6], SamplingParams(max_new_tokens=3, temperature=0)))
    second = engine.submit(EngineRequest([7], GREEDY))
    engine.step()
    assert not first.done() and engine.waiting == 1
    engine.step()
    assert first.done() and engine.active == 0 and engine.waiting == 1
    assert second.started_at is None
    engine.step()
    assert second.started_at is not None and engine.active == 1 and engine.waiting == 0


def test_first_token_at_is_when_the_first_token_came_and_later_tokens_leave_it(model):
    engine = Engine(model, max_batch=1, run_ahead=False)
    params = dataclasses.replace(GREEDY, max_new_tokens=6)
    handle = engine.submit(EngineRequest([1, 2], params))
    engine.step()
    first = handle.first_token_at
    assert first is not None and handle.started_at <= first
    run_until_idle(engine)
    assert handle.first_token_at == first < handle.finished_at


def test_on_token_deltas_concatenate_to_the_final_text(text_setup, run_ahead):
    model, tok = text_setup
    engine = Engine(model, tok, max_batch=2, run_ahead=run_ahead)
    cases = [
        ("héllo", SamplingParams(max_new_tokens=30, temperature=1.0, seed=3)),
        ("the quick", SamplingParams(max_new_tokens=30, temperature=1.0, seed=4, stop=("o",))),
        ("", SamplingParams(max_new_tokens=20, temperature=1.0, seed=5)),
    ]
    streams: list[list[tuple[int, str]]] = [[] for _ in cases]
    handles = [
        engine.submit(
            EngineRequest(prompt=p, params=sp, on_token=lambda t, d, s=s: s.append((t, d)))
        )
        for (p, sp), s in zip(cases, streams)
    ]
    run_until_idle(engine)
    for handle, stream, (prompt, sp) in zip(handles, streams, cases):
        got = handle.result(0)
        assert "".join(d for _, d in stream) == got.text
        assert got.text == generate(model, tok, [prompt], sp)[0].text
        sampled = [t for t, _ in stream if t != tok.eos_id]
        assert sampled[: len(got.token_ids)] == got.token_ids
    assert handles[1].result(0).finish_reason == "stop"  # held-back stop prefixes exercised


def test_a_model_with_more_ids_than_its_tokenizer_samples_only_decodable_ones(
    text_setup, run_ahead
):
    _, tok = text_setup
    model = context_sensitive_model(0, vocab_size=512)
    assert model.config.vocab_size > tok.vocab_size
    params = SamplingParams(max_new_tokens=40, temperature=2.0, seed=0, eos=False)
    engine = Engine(model, tok, max_batch=2, run_ahead=run_ahead)
    handles = [engine.submit(EngineRequest(prompt=p, params=params)) for p in ("héllo", "the")]
    run_until_idle(engine)
    for handle, prompt in zip(handles, ("héllo", "the")):
        got = handle.result(0)
        assert max(got.token_ids) < tok.vocab_size
        assert got.token_ids == generate(model, tok, [prompt], params)[0].token_ids


def seed_ending_inside_a_character(model, tok, prompt: str, tokens: int) -> int:
    """A seed whose first `tokens` sampled tokens end inside a UTF-8 character."""
    for seed in range(1000):
        params = SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=seed, eos=False)
        ids = generate(model, tok, [prompt], params)[0].token_ids
        if tok.decode(ids).endswith("\ufffd"):
            return seed
    raise AssertionError("no seed in 1,000 ends inside a character")


def test_cancelling_releases_held_back_text_through_on_token(text_setup, run_ahead):
    model, tok = text_setup
    engine = Engine(model, tok, max_batch=1, run_ahead=run_ahead)
    deltas: list[tuple[int, str]] = []
    # The first two tokens end inside a UTF-8 character, so that text is held back.
    seed = seed_ending_inside_a_character(model, tok, "dog", tokens=2)
    params = SamplingParams(max_new_tokens=50, temperature=1.0, seed=seed)
    handle = engine.submit(EngineRequest(prompt="dog", params=params,
                                         on_token=lambda t, d: deltas.append((t, d))))
    engine.step()
    handle.cancel()
    engine.step()
    result = handle.result(0)
    assert result.finish_reason == "cancelled"
    assert [t for t, _ in deltas] == [*result.token_ids, FLUSH_TOKEN_ID]
    assert deltas[-1][1] and "".join(d for _, d in deltas) == result.text


def poisoned_step(call: int, position: int):
    """A decode step whose logits turn NaN on its `call`-th use (0-based), for the rows whose
    input sits at `position` (as an fp16 overflow would for one request)."""
    calls = 0

    def step(model, tokens, positions, cache, rows=None, kv_len=None):
        nonlocal calls
        logits = decode_step(model, tokens, positions, cache, rows, kv_len)
        if calls == call:
            logits[positions[:, 0] == position] = float("nan")
        calls += 1
        return logits

    return step


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampling"])
def test_a_request_whose_logits_turn_non_finite_fails_alone(model, params, run_ahead):
    # Prompts of 3, 7 and 1 tokens decode at positions 3+n, 7+n and 1+n on the n-th step, so
    # position 5 on the third step is the first request's alone.
    engine = Engine(model, max_batch=3, run_ahead=run_ahead, step_fn=poisoned_step(2, 5))
    handles = [engine.submit(EngineRequest(p, params)) for p in PROMPTS[:3]]
    run_until_idle(engine)
    error = handles[0].exception(0)
    assert isinstance(error, NonFiniteLogitsError)
    assert "NaN or infinite at generated token 3" in str(error)
    for handle, prompt in zip(handles[1:], PROMPTS[1:3]):
        assert handle.result(0).token_ids == alone(model, prompt, params).token_ids
    assert engine.stats.failed == 1


def test_bad_requests_fail_alone_with_a_clear_error(model):
    engine = Engine(model, max_batch=2)
    good = engine.submit(EngineRequest([1, 2, 3], SAMPLED))
    too_long = engine.submit(EngineRequest(list(range(1, 125)), SamplingParams(max_new_tokens=8)))
    empty = engine.submit(EngineRequest([], GREEDY))
    out_of_vocab = engine.submit(EngineRequest([1, 10_000], GREEDY))
    text_without_tokenizer = engine.submit(EngineRequest(prompt="hi", params=GREEDY))
    for handle in (too_long, empty, out_of_vocab, text_without_tokenizer):
        assert handle.done()  # failed at submit: no wait for a slot
    with pytest.raises(ContextLengthError, match="context window"):
        too_long.result(0)
    with pytest.raises(ValueError, match="empty prompt"):
        empty.result(0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        out_of_vocab.result(0)
    with pytest.raises(ValueError, match="tokenizer"):
        text_without_tokenizer.result(0)
    truncated = engine.submit(
        EngineRequest(list(range(1, 125)), SamplingParams(max_new_tokens=8), truncate="left")
    )
    run_until_idle(engine)
    assert good.result(0).token_ids == alone(model, [1, 2, 3], SAMPLED).token_ids
    assert truncated.result(0).prompt_tokens == 120
    assert engine.stats.failed == 4


def test_params_that_are_not_sampling_params_fail_at_submit_and_not_the_batch(model, run_ahead):
    # Duck-typed params skip SamplingParams' checks; top_k=2.5 used to fail the sampling of
    # every request in the batch.
    bad_params = types.SimpleNamespace(**{**dataclasses.asdict(SAMPLED), "top_k": 2.5})
    engine = Engine(model, max_batch=2, run_ahead=run_ahead)
    good = engine.submit(EngineRequest([1, 2, 3], SAMPLED))
    bad = engine.submit(EngineRequest([4, 5, 6], bad_params))
    assert bad.done()
    with pytest.raises(ValueError, match="SamplingParams"):
        bad.result(0)
    run_until_idle(engine)
    assert good.result(0).token_ids == alone(model, [1, 2, 3], SAMPLED).token_ids


@pytest.mark.parametrize("failure", ["window-shrunk-by-a-swap", "prefill-raises"])
def test_a_request_that_fails_at_admission_frees_its_id_for_a_resubmission(
    model, failure, monkeypatch
):
    # The worker submits a job under its job id, so a redelivered job reuses the id.
    engine = Engine(model, max_batch=2)
    first = engine.submit(EngineRequest(list(range(1, 101)), GREEDY, request_id="job-1"))
    if failure == "prefill-raises":
        def broken_prefill(*args, **kwargs):
            raise RuntimeError("prefill fell over")

        monkeypatch.setattr(engine_module, "prefill", broken_prefill)
    else:  # applied at once (nothing runs): the queued 100-token prompt no longer fits
        engine.swap_model(context_sensitive_model(2, block_size=64))
    run_until_idle(engine)
    assert first.exception(0) is not None
    monkeypatch.undo()
    again = engine.submit(EngineRequest([1, 2, 3], GREEDY, request_id="job-1"))
    run_until_idle(engine)
    assert again.result(0).token_ids == alone(engine.model, [1, 2, 3], GREEDY).token_ids


def test_a_finished_requests_id_is_free_for_a_resubmission(model):
    engine = Engine(model, max_batch=2, run_ahead=False)
    params = dataclasses.replace(GREEDY, max_new_tokens=3)
    first = engine.submit(EngineRequest([1, 2], params, request_id="job-1"))
    run_until_idle(engine)
    assert first.result(0).finish_reason == "length"
    again = engine.submit(EngineRequest([1, 2], params, request_id="job-1"))
    run_until_idle(engine)
    assert again.result(0).token_ids == first.result(0).token_ids


def test_a_second_request_under_a_live_id_is_refused_and_cancel_reaches_the_first(model):
    engine = Engine(model, max_batch=2, run_ahead=False)
    long = SamplingParams(max_new_tokens=20, temperature=0.0, eos=False)
    first = engine.submit(EngineRequest([1, 2], long, request_id="job"))
    with pytest.raises(ValueError, match="already in the engine"):
        engine.submit(EngineRequest([3, 4], long, request_id="job"))
    engine.step()
    assert engine.cancel("job") is True
    run_until_idle(engine)
    assert first.result(0).finish_reason == "cancelled"
    assert 0 < len(first.result(0).token_ids) < 20


def test_a_failing_decode_step_fails_its_requests_and_the_engine_keeps_serving(model, run_ahead):
    calls = {"n": 0}

    def flaky_step(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device fell over")
        return decode_step(*args)

    engine = Engine(model, max_batch=2, step_fn=flaky_step, run_ahead=run_ahead)
    hit = [engine.submit(EngineRequest([1, 2], GREEDY)) for _ in range(2)]
    engine.step()
    engine.step()
    for handle in hit:
        with pytest.raises(RuntimeError, match="device fell over"):
            handle.result(0)
    assert engine.active == 0
    after = engine.submit(EngineRequest([1, 2], GREEDY))
    run_until_idle(engine)
    assert after.result(0).token_ids == alone(model, [1, 2], GREEDY).token_ids


def test_a_step_that_fails_outside_its_requests_leaves_waiting_ones_and_a_swap_alone(
    model, other_model
):
    # A failure the step's per-request guards do not catch (a device allocation, out of memory
    # during a hot swap) fails the requests in that step, not the queue or the pending swap.
    engine = Engine(model, max_batch=2)
    real_step, calls, queued = engine.step, {"n": 0}, threading.Event()

    def first_step_fails() -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            queued.wait(10)  # the requests and the swap below are waiting by now
            raise RuntimeError("out of memory (simulated)")
        return real_step()

    engine.step = first_step_fails  # what the engine thread calls
    engine.start()
    try:
        waiting = [engine.submit(EngineRequest([2, 3], GREEDY)) for _ in range(3)]
        assert engine.swap_model(other_model, wait=False) is False  # pending
        queued.set()
        expected = alone(other_model, [2, 3], GREEDY).token_ids
        assert [h.result(30).token_ids for h in waiting] == [expected] * 3
        assert engine.stats.swaps == 1
    finally:
        engine.stop()
    assert calls["n"] > 1


def test_a_raising_token_callback_fails_only_its_request(model, run_ahead):
    def broken(token_id: int, delta: str) -> None:
        raise KeyError("consumer bug")

    engine = Engine(model, max_batch=2, run_ahead=run_ahead)
    bad = engine.submit(EngineRequest([1, 2], GREEDY, on_token=broken))
    good = engine.submit(EngineRequest([3, 4], GREEDY))
    run_until_idle(engine)
    with pytest.raises(KeyError, match="consumer bug"):
        bad.result(0)
    assert good.result(0).token_ids == alone(model, [3, 4], GREEDY).token_ids


def test_engine_thread_serves_requests_from_many_threads_and_stops_cleanly(model):
    engine = Engine(model, max_batch=3)
    engine.start()
    handles: list[EngineHandle] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        h = engine.submit(EngineRequest([i + 1, i + 2, i + 3], SAMPLED))
        with lock:
            handles.append(h)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(5)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    for h in handles:
        g = h.result(WAIT_S)
        assert g.token_ids == alone(model, list(h.request.prompt_ids), SAMPLED).token_ids
        assert h.submitted_at <= h.started_at <= h.first_token_at <= h.finished_at
    assert engine.stop(drain=True, timeout=WAIT_S)
    assert not engine.is_running
    with pytest.raises(EngineStoppedError):
        engine.submit(EngineRequest([1], GREEDY))


def test_idle_engine_thread_waits_instead_of_stepping(model):
    engine = Engine(model, max_batch=2)
    engine.start()
    engine.submit(EngineRequest([1], GREEDY)).result(WAIT_S)
    steps = engine.stats.steps
    # A busy loop would step thousands of times in this window.
    threading.Event().wait(0.2)
    assert engine.stats.steps == steps
    # ...and a new request still wakes it.
    assert engine.submit(EngineRequest([2], GREEDY)).result(WAIT_S).finish_reason == "length"
    assert engine.stop(timeout=WAIT_S)


def test_progress_age_grows_only_while_the_engine_has_work_and_its_step_is_stuck(model):
    # What the worker's watchdog reads (LLM_ENGINE_STALL_S): a hung kernel or a deadlock makes
    # it grow, an idle engine reports none, and it reads without the locks a stuck step holds.
    entered, release = threading.Event(), threading.Event()

    def hung_step(*args):
        entered.set()
        release.wait(WAIT_S)
        return decode_step(*args)

    engine = Engine(model, max_batch=1, step_fn=hung_step)
    engine.start()
    try:
        assert engine.progress_age_s == 0.0
        handle = engine.submit(EngineRequest([1, 2], GREEDY))
        assert entered.wait(WAIT_S)
        wait_until(lambda: engine.progress_age_s > 0.2, WAIT_S, message="stall seen")
        age = engine.progress_age_s
        wait_until(lambda: engine.progress_age_s > age + 0.1, WAIT_S, message="stall growing")
        release.set()
        assert handle.result(WAIT_S).finish_reason == "length"
        wait_until(lambda: engine.progress_age_s == 0.0, WAIT_S, message="idle again")
    finally:
        release.set()
        assert engine.stop(timeout=WAIT_S)


def test_stop_without_drain_cancels_accepted_requests(model):
    engine = Engine(model, max_batch=1)
    started = threading.Event()
    long = SamplingParams(max_new_tokens=100, temperature=0.0)
    running = engine.submit(EngineRequest([1], long, on_token=lambda t, d: started.set()))
    queued = engine.submit(EngineRequest([2], long))
    engine.start()
    assert started.wait(WAIT_S)
    assert engine.stop(drain=False, timeout=WAIT_S)
    assert running.result(0).finish_reason == "cancelled"
    assert len(running.result(0).token_ids) < 100
    assert queued.result(0).finish_reason == "cancelled" and queued.result(0).token_ids == []


def test_stop_without_drain_on_an_engine_driven_by_step_cancels_accepted_requests(model):
    engine = Engine(model, max_batch=1, run_ahead=False)
    long = SamplingParams(max_new_tokens=50, temperature=0.0, eos=False)
    running = engine.submit(EngineRequest([1, 2], long))
    queued = engine.submit(EngineRequest([3], long))
    engine.step()
    assert engine.stop(drain=False)
    assert running.result(0).finish_reason == "cancelled"
    assert 0 < len(running.result(0).token_ids) < 50
    assert (queued.result(0).finish_reason, queued.result(0).token_ids) == ("cancelled", [])


def test_stop_with_drain_finishes_accepted_requests(model):
    engine = Engine(model, max_batch=1)
    handles = [engine.submit(EngineRequest([i + 1], GREEDY)) for i in range(3)]
    engine.start()
    assert engine.stop(drain=True, timeout=WAIT_S)
    assert [h.result(0).finish_reason for h in handles] == ["length"] * 3


def test_swap_model_lets_active_requests_finish_on_the_old_model(model, other_model, run_ahead):
    engine = Engine(model, max_batch=2, metadata={"version": "1"}, run_ahead=run_ahead)
    old = engine.submit(EngineRequest([1, 2, 3], GREEDY))
    engine.step()
    assert engine.swap_model(other_model, metadata={"version": "2"}) is False  # old is active
    new = engine.submit(EngineRequest([1, 2, 3], GREEDY))
    engine.step()
    assert new.started_at is None  # admission paused while the old model drains
    run_until_idle(engine)
    assert old.metadata == {"version": "1"} and new.metadata == {"version": "2"}
    assert old.result(0).token_ids == alone(model, [1, 2, 3], GREEDY).token_ids
    assert new.result(0).token_ids == alone(other_model, [1, 2, 3], GREEDY).token_ids
    assert old.result(0).token_ids != new.result(0).token_ids
    assert engine.metadata == {"version": "2"} and engine.stats.swaps == 1


def test_swap_model_on_a_running_engine_blocks_until_switched(model, other_model):
    engine = Engine(model, max_batch=2, metadata={"version": "1"})
    engine.start()
    running = threading.Event()
    before = engine.submit(EngineRequest([4, 5], GREEDY, on_token=lambda t, d: running.set()))
    assert running.wait(WAIT_S)  # admitted on the old model before the swap is asked for
    assert engine.swap_model(other_model, metadata={"version": "2"}, timeout=WAIT_S) is True
    after = engine.submit(EngineRequest([4, 5], GREEDY))
    assert before.result(WAIT_S).token_ids == alone(model, [4, 5], GREEDY).token_ids
    assert after.result(WAIT_S).token_ids == alone(other_model, [4, 5], GREEDY).token_ids
    assert (before.metadata, after.metadata) == ({"version": "1"}, {"version": "2"})
    assert engine.stop(timeout=WAIT_S)


@contextlib.contextmanager
def address_space_headroom(nbytes: int):
    """Lower this process's RLIMIT_AS to what it maps now plus `nbytes`, so a larger allocation
    fails for real (ENOMEM), whatever the machine's memory or overcommit policy."""
    resource = pytest.importorskip("resource")
    try:
        with open("/proc/self/status") as status:
            vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        pytest.skip("needs Linux's /proc/self/status")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_kb * 1024 + nbytes
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip("the address-space limit is already lower")
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_swap_that_cannot_allocate_its_cache_fails_at_once_without_pausing_admission(model):
    # The new model's cache (8 GiB at 64 slots) does not fit beside the serving one: the swap
    # must fail when asked for, not after the batch has drained for it.
    engine = Engine(model, max_batch=64, metadata={"version": "1"})
    running = engine.submit(EngineRequest([1, 2, 3], GREEDY))
    engine.step()
    big = context_sensitive_model(3, n_layer=8, block_size=16384)  # a 4 MiB position table
    with address_space_headroom(1 << 30), pytest.raises(RuntimeError, match="memory"):
        engine.swap_model(big, metadata={"version": "2"})
    del big
    after = engine.submit(EngineRequest([1, 2, 3], GREEDY))
    engine.step()
    assert after.started_at is not None and engine.active == 2  # admission never paused
    run_until_idle(engine)
    assert running.result(0).token_ids == after.result(0).token_ids
    assert engine.metadata == {"version": "1"} and engine.stats.swaps == 0


def test_swap_to_a_model_with_a_smaller_window_than_max_len_is_refused(model):
    engine = Engine(model, max_batch=1, max_len=128)
    small = context_sensitive_model(2, block_size=64)
    with pytest.raises(ValueError, match="max_len"):
        engine.swap_model(small)
    assert engine.model is model


@pytest.mark.parametrize("run_ahead", [False, True], ids=["step-by-step", "run-ahead"])
def test_the_host_reads_a_steps_tokens_after_the_next_step_is_queued_only_when_running_ahead(
    model, run_ahead
):
    events: list[str] = []

    def recording_step(*args):
        events.append("step")
        return decode_step(*args)

    engine = Engine(model, max_batch=2, step_fn=recording_step, run_ahead=run_ahead)
    params = dataclasses.replace(GREEDY, max_new_tokens=6)
    handle = engine.submit(EngineRequest([3, 1, 4], params, on_token=lambda t, d: events.append(t)))
    run_until_idle(engine)
    # Steps queued before each token reached the host: the prefill samples token 1 with none.
    steps_before = [events[:i].count("step") for i, e in enumerate(events) if e != "step"]
    assert steps_before == ([0, 2, 3, 4, 5, 6] if run_ahead else [0, 1, 2, 3, 4, 5])
    assert handle.result(0).token_ids == alone(model, [3, 1, 4], params).token_ids


def joining_one_step_apart(engine: Engine) -> list[list[int]]:
    """PROMPTS joining one step apart (4 requests on 3 slots), greedy and sampled in turn."""
    handles = []
    for i, prompt in enumerate(PROMPTS):
        params = SAMPLED if i % 2 else dataclasses.replace(GREEDY, max_new_tokens=12 + i)
        handles.append(engine.submit(EngineRequest(prompt, params)))
        engine.step()
    run_until_idle(engine)
    return [h.result(0).token_ids for h in handles]


def test_a_compiled_engine_serves_a_swapped_in_model_without_compiling_again(model, other_model):
    # A GPU worker's engine (compiled, running ahead), here on a CPU: a hot swap must give the
    # new model's tokens, and reuse the compiled step rather than compile on the engine thread.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # other tests' compiles of decode_step must not stand in for this one
    engine = Engine(model, max_batch=3, compile=True, run_ahead=True)
    assert joining_one_step_apart(engine) == joining_one_step_apart(Engine(model, max_batch=3))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert engine.swap_model(other_model) is True
    swapped = joining_one_step_apart(engine)
    assert swapped == joining_one_step_apart(Engine(other_model, max_batch=3))
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.gpu
def test_compiled_and_run_ahead_decoding_match_eager_step_by_step_on_cuda():
    cuda_model = context_sensitive_model(0).cuda()
    results = {}
    for compiled, run_ahead in [(False, False), (False, True), (True, False), (True, True)]:
        engine = Engine(cuda_model, max_batch=3, compile=compiled, run_ahead=run_ahead)
        results[compiled, run_ahead] = joining_one_step_apart(engine)
    assert all(r == results[False, False] for r in results.values()), results


@pytest.mark.gpu
def test_a_compiled_engine_on_cuda_serves_a_swapped_in_model():
    # CUDA graphs record the old model's weight addresses; after a swap the replayed steps must
    # read the new weights.
    cuda_model, cuda_other = context_sensitive_model(0).cuda(), context_sensitive_model(1).cuda()
    engine = Engine(cuda_model, max_batch=3, compile=True)
    assert joining_one_step_apart(engine) == joining_one_step_apart(Engine(cuda_model, max_batch=3))
    assert engine.swap_model(cuda_other) is True
    swapped = joining_one_step_apart(engine)
    assert swapped == joining_one_step_apart(Engine(cuda_other, max_batch=3))


def test_eager_decode_covers_only_the_active_slots(model):
    widths = []

    def recording_step(model, tokens, positions, cache, rows, kv_len):
        widths.append(tokens.shape[0])
        return decode_step(model, tokens, positions, cache, rows, kv_len)

    engine = Engine(model, max_batch=8, step_fn=recording_step)
    params = dataclasses.replace(GREEDY, max_new_tokens=4)
    alone = generate_ids(model, [[3, 1, 4]], params)[0]
    handle = engine.submit(EngineRequest([3, 1, 4], params))
    while engine.step():
        pass
    assert handle.result(timeout=5).token_ids == alone.token_ids
    assert widths and set(widths) == {1}


@pytest.mark.parametrize(
    ("lengths", "last_rows"),
    [([12, 2, 12], (0, 3)), ([2, 2, 12], (2, 3))],
    ids=["a-freed-slot-between-two-running", "one-left-in-the-last-slot"],
)
def test_eager_decode_spans_only_the_active_slots_and_freed_slots_are_harmless(
    model, lengths, last_rows
):
    rows_seen = []

    def recording_step(model, tokens, positions, cache, rows, kv_len):
        rows_seen.append((rows.start, rows.stop))
        return decode_step(model, tokens, positions, cache, rows, kv_len)

    engine = Engine(model, max_batch=4, step_fn=recording_step)
    params = [dataclasses.replace(GREEDY, max_new_tokens=n) for n in lengths]
    handles = [engine.submit(EngineRequest(p, sp)) for p, sp in zip(PROMPTS, params)]
    run_until_idle(engine)
    assert rows_seen[0] == (0, 3) and rows_seen[-1] == last_rows
    for handle, prompt, sp in zip(handles, PROMPTS, params):
        assert handle.result(0).token_ids == alone(model, prompt, sp).token_ids


@contextlib.contextmanager
def recorded_prefills(model):
    """Yields a list that collects the (batch, width) of each prefill forward (width > 1)."""
    shapes = []
    hook = model.register_forward_hook(
        lambda module, args, out: shapes.append(tuple(args[0].shape))
        if args[0].shape[1] > 1 else None
    )
    try:
        yield shapes
    finally:
        hook.remove()


def test_requests_admitted_together_into_adjacent_slots_share_one_prefill(model):
    with recorded_prefills(model) as prefill_batches:
        engine = Engine(model, max_batch=4)
        handles = [engine.submit(EngineRequest(p, GREEDY)) for p in PROMPTS[:3]]
        bad = engine.submit(EngineRequest([], GREEDY))  # fails alone, takes no slot
        engine.step()
        assert prefill_batches == [(3, max(len(p) for p in PROMPTS[:3]))]
        assert isinstance(bad.exception(0), ValueError) and engine.active == 3
        run_until_idle(engine)
    for handle, prompt in zip(handles, PROMPTS):
        assert handle.result(0).token_ids == alone(model, prompt, GREEDY).token_ids
    assert engine.stats.prefills == 3


def test_requests_admitted_into_slots_apart_prefill_apart_and_the_one_between_is_unchanged(
    model,
):
    short = dataclasses.replace(GREEDY, max_new_tokens=2, eos=False)
    long = dataclasses.replace(GREEDY, max_new_tokens=20, eos=False)
    requests = {"A": ([1, 2, 3], short), "B": ([7, 8, 9], long), "C": ([4, 5, 6], short)}
    with recorded_prefills(model) as prefill_batches:
        engine = Engine(model, max_batch=3, run_ahead=False)
        handles = {k: engine.submit(EngineRequest(p, sp, request_id=k))
                   for k, (p, sp) in requests.items()}  # fmt: skip
        while not (handles["A"].done() and handles["C"].done()):
            engine.step()
        assert not handles["B"].done()  # slots 0 and 2 free, slot 1 running
        # Equal lengths, so only the gap between their slots keeps them out of one prefill.
        requests |= {"D": ([10, 11, 12], long), "E": ([13, 14, 15], long)}
        for k in "DE":
            handles[k] = engine.submit(EngineRequest(*requests[k], request_id=k))
        run_until_idle(engine)
    for k, (prompt, sp) in requests.items():
        assert handles[k].result(0).token_ids == alone(model, prompt, sp).token_ids, k
    assert prefill_batches == [(3, 3), (1, 3), (1, 3)]


def test_a_long_prompt_does_not_pad_the_short_ones_in_a_shared_prefill(model):
    with recorded_prefills(model) as prefill_batches:
        engine = Engine(model, max_batch=3)
        prompts = [[5, 6], [7, 8, 9], list(range(1, 41))]
        handles = [engine.submit(EngineRequest(p, GREEDY)) for p in prompts]
        engine.step()
        run_until_idle(engine)
    # Padding [5, 6] and [7, 8, 9] to 40 would make them cost 40 tokens each.
    assert prefill_batches == [(2, 3), (1, 40)]
    for handle, prompt in zip(handles, prompts):
        assert handle.result(0).token_ids == alone(model, prompt, GREEDY).token_ids


def test_on_token_reports_the_result_tokens_not_the_eos_that_ends_it(text_setup, run_ahead):
    """A streaming client counts on_token's tokens: the eos is not output, so not one of them."""
    model, tok = text_setup
    eos_ended = (SamplingParams(max_new_tokens=40, temperature=2.0, seed=seed)
                 for seed in range(500))  # fmt: skip
    params = next(p for p in eos_ended
                  if generate(model, tok, ["dog"], p)[0].finish_reason == "eos")  # fmt: skip
    result, seen = run_alone_recording_tokens(Engine(model, tok, max_batch=1,
                                                     run_ahead=run_ahead), "dog", params)
    assert result.finish_reason == "eos"
    assert [t for t, _ in seen if t != FLUSH_TOKEN_ID] == result.token_ids
    assert tok.eos_id not in [t for t, _ in seen]
    assert "".join(d for _, d in seen) == result.text


def test_text_released_by_the_eos_comes_through_on_token_with_the_flush_id(text_setup):
    """A stop string beginning with the text's last character holds that character back until
    the eos ends the request: it is released with FLUSH_TOKEN_ID, never with the eos id."""
    model, tok = text_setup
    seeds = (SamplingParams(max_new_tokens=40, temperature=2.0, seed=seed) for seed in range(500))
    params, text = next((p, g.text) for p in seeds
                        for g in generate(model, tok, ["dog"], p)
                        if g.finish_reason == "eos" and g.text)  # fmt: skip
    params = dataclasses.replace(params, stop=(text[-1] + "\x07",))
    result, seen = run_alone_recording_tokens(Engine(model, tok, max_batch=1, run_ahead=False),
                                              "dog", params)
    assert (result.finish_reason, result.text) == ("eos", text)
    assert seen[-1] == (FLUSH_TOKEN_ID, text[-1])
    assert [t for t, _ in seen[:-1]] == result.token_ids
