"""Redis brought to a given share of its maxmemory, as months of job records would bring it.

Sets CONFIG maxmemory (noeviction, as the chart runs Redis) on a test server only, and lifts it
afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from services.common.redis_memory import MemoryUse

FILLER_PART = 16_384  # small writes: Redis frees a big one's query buffer later, on its own
BATCH = 4  # writes per round trip: a pipeline of all of them is one big query buffer too


@contextlib.contextmanager
def redis_at(
    admin: Any, fraction: float, filler_bytes: int = 4 << 20
) -> Iterator[Callable[[], None]]:
    """Redis's used_memory at `fraction` of a maxmemory (noeviction) set for it, over a filler
    (old jobs' records, in effect) big enough that a few writes more do not move it much.
    Yields a function that sets the cap again from a fresh reading, for a test that must stay
    at the fraction however Redis's memory drifts meanwhile (a CI run once read a figure that
    then fell: its cap sat far above the watermark)."""
    parts = [f"filler:{i}" for i in range(filler_bytes // FILLER_PART)]
    for start in range(0, len(parts), BATCH):
        with admin.pipeline(transaction=False) as pipe:
            for key in parts[start:start + BATCH]:
                pipe.set(key, b"x" * FILLER_PART)
            pipe.execute()

    def hold() -> None:
        used = MemoryUse.from_info(admin.info("memory")).used
        admin.config_set("maxmemory", str(int(used / fraction)))

    admin.config_set("maxmemory-policy", "noeviction")
    hold()
    try:
        yield hold
    finally:
        admin.config_set("maxmemory", "0")
        admin.delete(*parts)

