"""Cluster-wide job statistics kept in one Redis hash (`llm:stats`), for the API's /metrics.

Workers add to it when a job finishes; the API turns it into Prometheus families. No I/O here.
"""

from __future__ import annotations

import math

# Fixed ladders, not derived from settings: every worker and API must name the same bucket keys in
# llm:stats. Both reach 1800 s, the default 600 s job time limit plus a long queue wait, because
# both include the time a job waited in the queue, which is what grows in a backlog.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                   1200.0, 1800.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                300.0, 600.0, 1800.0)
HISTOGRAMS = {"latency": LATENCY_BUCKETS, "ttft": TTFT_BUCKETS}
STATUSES = ("succeeded", "failed", "cancelled")


def _bucket(value: float, buckets: tuple[float, ...]) -> str:
    for le in buckets:
        if value <= le:
            return repr(le)
    return "+Inf"


def finish_increments(
    status: str, tokens: int, latency_s: float | None, ttft_s: float | None
) -> tuple[dict[str, int], dict[str, float]]:
    """(HINCRBY, HINCRBYFLOAT) increments for one finished job (non-cumulative buckets).

    Latency counts succeeded jobs only; time to first token counts every job that made one,
    whatever its end: a job that streamed and then timed out or was cancelled is exactly the
    slow case a backlog makes.
    """
    counters: dict[str, int] = {f"jobs:{status}": 1, "tokens": max(tokens, 0)}
    sums: dict[str, float] = {}
    for name, value in (("latency", latency_s), ("ttft", ttft_s)):
        if value is None or not math.isfinite(value):
            continue
        if name == "latency" and status != "succeeded":
            continue
        value = max(value, 0.0)
        counters[f"{name}:bucket:{_bucket(value, HISTOGRAMS[name])}"] = 1
        counters[f"{name}:count"] = 1
        sums[f"{name}:sum"] = value
    return counters, sums


def cumulative_buckets(stats: dict[str, str], name: str) -> list[tuple[str, float]]:
    """Prometheus histogram buckets [(le, cumulative count)] ending with +Inf."""
    total = 0.0
    out = []
    for le in (*map(repr, HISTOGRAMS[name]), "+Inf"):
        total += float(stats.get(f"{name}:bucket:{le}", 0))
        out.append((le, total))
    return out
