"""Collects a job's token deltas from the engine thread and hands them out as stream chunks.

A redelivered job regenerates the text it already streamed (same seed): those characters are not
sent twice, and if the new text diverges, ends shorter, or takes fewer tokens to reach what
clients hold, a `reset` chunk replaces it. Token counts add up: a `reset` carries the tokens of
its text, each `token` chunk the tokens since, so at the end the client's count is the job's
completion_tokens. No Redis here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from lmcore.engine import FLUSH_TOKEN_ID


@dataclass(frozen=True)
class Chunk:
    kind: str  # "token" | "reset"
    text: str
    tokens: int


class TokenSink:
    def __init__(self, already_streamed: str = "", already_tokens: int = 0) -> None:
        self._lock = threading.Lock()
        self._text = ""
        self._tokens = 0
        self._stream = already_streamed  # what clients have been sent (since the last reset)
        self._reported = already_tokens  # the tokens that text is counted as
        self.first_token_at: float | None = None  # Unix time

    def on_token(self, token_id: int, delta: str) -> None:
        """Engine callback (engine thread): keep it cheap."""
        with self._lock:
            self._text += delta
            if token_id != FLUSH_TOKEN_ID:
                self._tokens += 1
                if self.first_token_at is None:
                    self.first_token_at = time.time()

    def held(self) -> tuple[str, int]:
        """The text and token count this attempt has generated so far (task thread)."""
        with self._lock:
            return self._text, self._tokens

    def take(self, final: bool = False) -> list[Chunk]:
        """What to append to the stream now (task thread). `final`: the job has ended, so
        clients must end up holding exactly its text, with every token counted."""
        with self._lock:
            text, tokens = self._text, self._tokens
        sent, reported = self._stream, self._reported  # what clients hold
        if (text, tokens) == (sent, reported):
            return []
        # A token chunk only adds: a redelivery that reached clients' text in fewer tokens
        # than they were told resets them instead, so their count is never left too high.
        if text.startswith(sent) and tokens >= reported and (len(text) > len(sent) or final):
            # Tokens that added no text yet (half a character, a possible stop) count here.
            chunk = Chunk("token", text[len(sent):], tokens - reported)
        elif final or not sent.startswith(text):
            chunk = Chunk("reset", text, tokens)
        else:
            return []  # still regenerating what clients already have
        self._stream, self._reported = text, tokens
        return [chunk]


def streamed(entries: list[tuple[str, dict[str, str]]]) -> tuple[str, int]:
    """The text a client holds after reading these stream entries, and its token count."""
    text, tokens = "", 0
    for _, fields in entries:
        kind = fields.get("type")
        if kind == "token":
            text += fields.get("text", "")
            tokens += int(fields.get("tokens") or 0)
        elif kind == "reset":
            text, tokens = fields.get("text", ""), int(fields.get("tokens") or 0)
    return text, tokens


def streamed_text(entries: list[tuple[str, dict[str, str]]]) -> str:
    """The text a client holds after reading these stream entries."""
    return streamed(entries)[0]
