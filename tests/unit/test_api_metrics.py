"""The API's /metrics text (services.api.metrics.render) from Redis values: families and help."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.api.metrics import HttpMetrics, render
from services.common.stats import finish_increments

pytestmark = pytest.mark.unit


def heartbeat(nodename: str, version: str, **extra: Any) -> dict[str, Any]:
    """A worker's heartbeat as services.worker.runtime writes it."""
    return {
        "nodename": nodename, "host": "h", "pid": 1, "ts": 0.0,
        "model": {"name": "llm", "version": version, "run_id": "r", "uri": "models:/llm@prod"},
        "active": 3, "waiting": 5, "max_batch": 8, **extra,
    }  # fmt: skip


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_metrics_show_each_workers_model_a_refused_version_and_engine_occupancy() -> None:
    # A promoted version every worker refuses must be scrapeable: the alias names 2, workers
    # serve 1. The refusal was only in the heartbeat JSON and a worker log line.
    refusal = {"version": "2", "error": "CheckpointError: bad config.json", "tries": 1,
               "at": 0.0, "retry_in_s": None}  # fmt: skip
    workers = [heartbeat("w1@a", "1", refused_model=refusal), heartbeat("w2@b", "1")]
    got = samples(render(HttpMetrics(), {}, 0, workers))

    assert got[("llm_workers", ())] == 2
    for worker in ("w1@a", "w2@b"):
        labels = (("model", "llm"), ("version", "1"), ("worker", worker))
        assert got[("llm_worker_model_info", labels)] == 1
        assert got[("llm_worker_active_requests", (("worker", worker),))] == 3
        assert got[("llm_worker_waiting_requests", (("worker", worker),))] == 5
        assert got[("llm_worker_batch_slots", (("worker", worker),))] == 8
    refused = {k: v for k, v in got.items() if k[0] == "llm_worker_refused_model"}
    assert refused == {("llm_worker_refused_model", (("version", "2"), ("worker", "w1@a"))): 1}


def test_metrics_without_redis_have_no_worker_families() -> None:
    names = {name for name, _ in samples(render(HttpMetrics(), None, None, None))}
    assert "llm_redis_up" in names
    assert not any(name.startswith("llm_worker") for name in names)


# Counted by each API process; every other family is read from Redis.
PER_PROCESS_FAMILIES = {
    "llm_http_requests", "llm_http_request_duration_seconds", "llm_redis_up",
    "llm_event_streams_open", "llm_event_streams_parked", "llm_sync_waits_open",
}  # fmt: skip


def test_every_family_says_how_to_aggregate_it_over_api_replicas() -> None:
    # Every replica exports the Redis-derived families: a sum over pods multiplied the job,
    # token and worker numbers by the replica count, while the HTTP counters must be summed.
    stats = {"jobs:succeeded": "6", "tokens": "60"}
    families = list(text_string_to_metric_families(
        render(HttpMetrics(), stats, 0, [heartbeat("w1@a", "1")]).decode()
    ))  # fmt: skip
    names = {family.name for family in families}
    assert PER_PROCESS_FAMILIES < names and "llm_jobs" in names and "llm_workers" in names
    for family in families:
        if family.name in PER_PROCESS_FAMILIES:
            assert family.documentation.endswith("Per API process: sum over replicas."), family
        else:
            assert "Cluster-wide" in family.documentation, family
            assert "aggregate over replicas with max, not sum" in family.documentation, family


def test_latency_and_ttft_help_name_the_jobs_they_count() -> None:
    # "Submission to first token" read as every job, yet a job that streamed tokens and then
    # failed or was cancelled is not observed: SLO dashboards must know what they plot.
    stats: dict[str, float] = {}
    for status in ("succeeded", "failed", "cancelled"):
        counters, sums = finish_increments(status, 10, 2.0, 0.5)
        for key, value in (*counters.items(), *sums.items()):
            stats[key] = stats.get(key, 0) + value
    families = {
        f.name: f for f in text_string_to_metric_families(
            render(HttpMetrics(), {k: str(v) for k, v in stats.items()}, 0, []).decode()
        )
    }  # fmt: skip
    latency = families["llm_job_latency_seconds"]
    assert _count(latency) == 1  # the succeeded job only
    assert "of succeeded jobs, queue time included" in latency.documentation
    assert "failed and cancelled jobs are not observed" in latency.documentation
    ttft = families["llm_time_to_first_token_seconds"]
    assert _count(ttft) == 3  # every job that made a first token, whatever its end
    assert "every job that made one, whatever its end" in ttft.documentation


def _count(family: object) -> float:
    return next(s.value for s in family.samples if s.name == f"{family.name}_count")


def test_the_histograms_reach_past_the_job_time_limit_with_the_queue_wait() -> None:
    # A job that waited 10 minutes in a backlog and ran to its 600 s time limit must land in a
    # finite bucket, or the p99 of a backlog reads as +Inf.
    counters, _ = finish_increments("succeeded", 10, 1100.0, 700.0)
    assert "latency:bucket:1200.0" in counters
    assert "ttft:bucket:1800.0" in counters
