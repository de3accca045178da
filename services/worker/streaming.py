"""Collects a job's token deltas from the engine thread and hands them out as stream chunks.

A redelivered job regenerates the text it already streamed (same seed): those characters are not
sent twice, and if the new text diverges a `reset` chunk replaces what clients hold. No Redis here.
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
    def __init__(self, already_streamed: str = "") -> None:
        self._lock = threading.Lock()
        self._text = ""
        self._tokens = 0
        self._tokens_taken = 0
        self._stream = already_streamed  # what clients have been sent (since the last reset)
        self.first_token_at: float | None = None  # Unix time

    def on_token(self, token_id: int, delta: str) -> None:
        """Engine callback (engine thread): keep it cheap."""
        with self._lock:
            self._text += delta
            if token_id != FLUSH_TOKEN_ID:
                self._tokens += 1
                if self.first_token_at is None:
                    self.first_token_at = time.time()

    def take(self) -> list[Chunk]:
        """What to append to the stream now (task thread)."""
        with self._lock:
            text, tokens = self._text, self._tokens - self._tokens_taken
            self._tokens_taken = self._tokens
        sent = self._stream
        if text.startswith(sent):
            if len(text) == len(sent):
                return []
            self._stream = text
            return [Chunk("token", text[len(sent):], tokens)]
        if sent.startswith(text):
            return []  # still regenerating what clients already have
        self._stream = text
        return [Chunk("reset", text, tokens)]


def streamed_text(entries: list[tuple[str, dict[str, str]]]) -> str:
    """The text a client holds after reading these stream entries."""
    text = ""
    for _, fields in entries:
        kind = fields.get("type")
        if kind == "token":
            text += fields.get("text", "")
        elif kind == "reset":
            text = fields.get("text", "")
    return text
