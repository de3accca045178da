"""The API's /metrics text (services.api.metrics.render) from Redis values: families and help."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.api.metrics import HttpMetrics, render

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
