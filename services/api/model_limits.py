"""The context window of the model the workers serve, for the API's token-count checks.

Workers publish block size and tokenizer to Redis when they load a model; this reads them
(cached a few seconds) and counts prompt tokens off the event loop. It never loads weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio

from lmcore.tokenizer import Tokenizer
from services.api.store import JobStore

CACHE_S = 5.0
INLINE_CHARS = 512


@dataclass(frozen=True)
class ModelLimits:
    block_size: int
    tokenizer: Tokenizer | None
    version: str | None

    async def count_tokens(self, text: str) -> int | None:
        if self.tokenizer is None:
            return None
        if len(text) <= INLINE_CHARS:  # microseconds: cheaper than a thread hop
            return len(self.tokenizer.encode(text))
        return len(await anyio.to_thread.run_sync(self.tokenizer.encode, text))


class ModelLimitsCache:
    """The current ModelLimits, or None until a worker has published one."""

    def __init__(self) -> None:
        self._limits: ModelLimits | None = None
        self._read_at = float("-inf")
        self._tokenizers: dict[str, Tokenizer] = {}

    async def get(self, store: JobStore) -> ModelLimits | None:
        if time.monotonic() - self._read_at < CACHE_S:
            return self._limits
        info = await store.current_model()
        self._limits = await self._build(store, info) if info.get("block_size") else None
        self._read_at = time.monotonic()
        return self._limits

    async def _build(self, store: JobStore, info: dict[str, str]) -> ModelLimits:
        digest = info.get("tokenizer", "")
        tokenizer = self._tokenizers.get(digest)
        if tokenizer is None and digest:
            data = await store.tokenizer_json(digest)
            if data is not None:
                tokenizer = await anyio.to_thread.run_sync(Tokenizer.from_str, data)
                self._tokenizers = {digest: tokenizer}  # keep only the newest
        return ModelLimits(int(info["block_size"]), tokenizer, info.get("version"))
