"""The worker's TokenSink: what a job's stream gets, so clients end up holding its result."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcore.engine import FLUSH_TOKEN_ID
from services.worker.token_sink import Chunk, TokenSink, streamed

pytestmark = pytest.mark.unit


def held(chunks: list[Chunk], text: str = "", tokens: int = 0) -> tuple[str, int]:
    """What a client holds (text, token count) after these chunks, starting from text/tokens."""
    entries = [("0-1", {"type": "token", "text": text, "tokens": str(tokens)})]
    entries += [(f"0-{i + 2}", {"type": c.kind, "text": c.text, "tokens": str(c.tokens)})
                for i, c in enumerate(chunks)]  # fmt: skip
    return streamed(entries)


def test_token_sink_skips_text_clients_already_have_and_resets_on_divergence() -> None:
    sink = TokenSink(already_streamed="Hello wor")
    for token, delta in enumerate(["Hel", "lo", " wor"]):
        sink.on_token(token, delta)
    assert sink.take() == []  # regenerating what was streamed before the redelivery
    sink.on_token(3, "ld")
    assert [(c.kind, c.text) for c in sink.take()] == [("token", "ld")]

    diverged = TokenSink(already_streamed="Hello")
    diverged.on_token(0, "Help")
    assert [(c.kind, c.text) for c in diverged.take()] == [("reset", "Help")]


def test_a_redelivered_job_that_ends_shorter_resets_clients_to_its_text() -> None:
    """Clients hold more than the new attempt made (it was cancelled, timed out or hit eos
    sooner): while it runs that is still a prefix, but at the end they must drop the rest."""
    sink = TokenSink(already_streamed="Hello world", already_tokens=3)
    sink.on_token(0, "Hello")
    assert sink.take() == []
    assert sink.take(final=True) == [Chunk("reset", "Hello", 1)]
    assert held(sink.take(final=True), "Hello world", 3) == ("Hello world", 3)  # nothing more


def test_tokens_that_add_no_text_yet_are_counted_with_the_next_chunk() -> None:
    sink = TokenSink()
    sink.on_token(7, "")  # the first bytes of a character, or the start of a possible stop
    sink.on_token(8, "")
    assert sink.take() == []
    sink.on_token(9, "é")
    assert sink.take() == [Chunk("token", "é", 3)]


def test_the_final_take_counts_tokens_whose_text_never_came() -> None:
    sink = TokenSink()
    sink.on_token(0, "a")
    sink.on_token(1, "b")
    chunks = sink.take()
    assert chunks == [Chunk("token", "ab", 2)]
    sink.on_token(2, "")  # e.g. a byte of a character the request ended inside
    assert sink.take() == []
    chunks += sink.take(final=True)
    assert held(chunks) == ("ab", 3)


def test_a_flush_delta_adds_text_but_no_token() -> None:
    sink = TokenSink()
    sink.on_token(1, "a")
    sink.on_token(FLUSH_TOKEN_ID, "b")
    assert sink.take(final=True) == [Chunk("token", "ab", 1)]


@pytest.mark.parametrize("final", [False, True])
def test_held_back_text_released_without_a_token_is_appended_not_reset(final: bool) -> None:
    """The engine releases text it held back (a possible stop string that was not one) as a
    FLUSH delta with no new token: clients append it; a `reset` means a redelivery to them."""
    sink = TokenSink()
    sink.on_token(5, "Hello")
    assert sink.take() == [Chunk("token", "Hello", 1)]
    sink.on_token(FLUSH_TOKEN_ID, " wor")
    assert sink.take(final) == [Chunk("token", " wor", 0)]


def test_a_redelivered_job_counts_only_the_tokens_beyond_what_clients_hold() -> None:
    sink = TokenSink(already_streamed="Hello", already_tokens=2)
    for token, delta in enumerate(["Hel", "lo", " you"]):
        sink.on_token(token, delta)
    chunks = sink.take(final=True)
    assert chunks == [Chunk("token", " you", 1)]
    assert held(chunks, "Hello", 2) == ("Hello you", 3)


def test_a_redelivery_reaching_clients_text_in_fewer_tokens_corrects_their_count() -> None:
    # The token chunk's count was floored at 0, so clients kept attempt 1's larger count; and
    # a final text equal to theirs sent nothing, though its count differed.
    # Attempt 1 streamed "ab" as 3 tokens (its 3rd: half a character), then died.
    sink = TokenSink(already_streamed="ab", already_tokens=3)
    for delta in ("ab", "c"):  # this attempt's kernels merged "a" and "b" into one token
        sink.on_token(1, delta)
    assert held(sink.take(final=True), "ab", 3) == ("abc", 2)
    sink = TokenSink(already_streamed="ab", already_tokens=3)
    for delta in ("a", "b"):
        sink.on_token(1, delta)
    assert held(sink.take(final=True), "ab", 3) == ("ab", 2)


# One engine callback: a token (or a FLUSH, which adds text but no token), its text delta, and
# whether the streamer takes the chunks after it.
EVENT = st.tuples(st.sampled_from([1, 1, 1, FLUSH_TOKEN_ID]),
                  st.sampled_from(["", "", "a", "b", "ab", "日"]), st.booleans())  # fmt: skip


@settings(max_examples=1000, deadline=None)
@given(attempts=st.lists(st.tuples(st.lists(EVENT, max_size=10), st.booleans()),
                         min_size=1, max_size=3))  # fmt: skip
def test_clients_end_holding_the_last_attempts_text_and_token_count(
    attempts: list[tuple[list[tuple[int, str, bool]], bool]],
) -> None:
    """Each attempt but the last dies mid-job and is redelivered; an attempt regenerates what the
    one before made first (same seed) or not (its kernels diverged). However they differ, the
    stream's last reset plus the chunks since is the last attempt's text and token count."""
    chunks: list[Chunk] = []  # the job's stream
    made: list[tuple[int, str, bool]] = []
    for number, (events, replays) in enumerate(attempts, start=1):
        made = made + events if replays else events
        sink = TokenSink(*held(chunks))  # what the worker reads back from the stream
        for token_id, delta, take in made:
            sink.on_token(token_id, delta)
            if take:
                chunks += sink.take()
        if number == len(attempts):
            chunks += sink.take(final=True)
    tokens = sum(1 for token_id, _, _ in made if token_id != FLUSH_TOKEN_ID)
    assert held(chunks) == ("".join(delta for _, delta, _ in made), tokens)


def test_streamed_follows_resets_for_text_and_tokens() -> None:
    entries = [
        ("1-0", {"type": "token", "text": "ab", "tokens": "2"}),
        ("2-0", {"type": "reset", "text": "x", "tokens": "1"}),
        ("3-0", {"type": "token", "text": "yz", "tokens": "2"}),
        ("4-0", {"type": "done", "status": "succeeded"}),
    ]
    assert streamed(entries) == ("xyz", 3)
