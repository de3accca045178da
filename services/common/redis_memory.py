"""Redis's memory as its own maxmemory check counts it, for the API's admission watermark and
the worker's liveness probe (both read INFO memory).

Redis leaves its AOF buffer and replicas' output buffers out of that check
(`mem_not_counted_for_evict`): with a busy disk the AOF buffer can hold megabytes for a moment,
and a raw used_memory would then read as "full" while Redis still takes every write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MemoryUse:
    used: int  # what Redis compares with maxmemory
    cap: int  # maxmemory; 0: none
    policy: str

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> MemoryUse:
        used = int(info.get("used_memory", 0)) - int(info.get("mem_not_counted_for_evict", 0))
        return cls(max(used, 0), int(info.get("maxmemory", 0)),
                   str(info.get("maxmemory_policy", "")))  # fmt: skip

    def over(self, fraction: float) -> bool:
        """At `fraction` of the cap or past it. Only noeviction refuses writes at the cap; the
        other policies evict keys instead, so they are never "over"."""
        return self.cap > 0 and self.policy == "noeviction" and self.used >= fraction * self.cap


NO_CAP = MemoryUse(0, 0, "")
