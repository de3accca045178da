"""The API's in-process HTTP metrics (`llm_http_requests_total`) over real HTTP: their labels."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.helpers.redis_server import redis_server
from tests.helpers.services import ApiProcess, service_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("api-metrics")
    with redis_server(root / "redis", appendonly=False) as redis:
        process = ApiProcess("api", service_env(redis.url, root / "no-model"), root / "logs")
        try:
            yield process.start()
        finally:
            process.stop()


def requests_counted(api: ApiProcess, method: str, route: str, status: int) -> float:
    text = httpx.get(f"{api.url}/metrics", timeout=10).text
    labels = f'method="{method}",route="{route}",status="{status}"'
    found = re.search(rf"^llm_http_requests_total\{{{re.escape(labels)}\}} ([0-9.]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_413_is_counted_under_its_route(api: ApiProcess) -> None:
    # BodySizeLimit answers before routing; a dashboard or alert on route="/jobs" errors must
    # still see the bodies it refused.
    too_big = b'{"prompt": "' + b"x" * (1 << 20) + b'"}'
    for path in ("/jobs", "/generate_text"):
        resp = httpx.post(f"{api.url}{path}", content=too_big, timeout=10,
                          headers={"Content-Type": "application/json"})  # fmt: skip
        assert resp.status_code == 413
        assert requests_counted(api, "POST", path, 413) == 1.0, path
    assert requests_counted(api, "POST", "unmatched", 413) == 0.0
    # A path no route serves is still "unmatched" (ids in raw paths would explode the labels).
    assert httpx.get(f"{api.url}/nowhere/123", timeout=10).status_code == 404
    assert requests_counted(api, "GET", "unmatched", 404) == 1.0


def test_a_head_probe_answers_as_get_and_is_counted_under_its_route(api: ApiProcess) -> None:
    # No worker here: /readyz is 503, and a HEAD probe must see that too, not a 405 or a 200.
    head = httpx.head(f"{api.url}/readyz", timeout=10)
    assert head.status_code == httpx.get(f"{api.url}/readyz", timeout=10).status_code == 503
    assert head.headers["Retry-After"] and head.content == b""
    assert requests_counted(api, "HEAD", "/readyz", 503) == 1.0
