"""The Lua scripts behind the job's state changes (services/common/scripts.py), run by a real
Redis: what each transition does when the lease or the record is not what the caller expects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.common import keys, scripts
from tests.helpers.redis_server import redis_server

pytestmark = pytest.mark.integration

LEASE_MS = 5_000


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    with redis_server(Path(tmp_path_factory.mktemp("scripts"))) as server:
        yield server.client()


def test_a_lease_that_expired_unclaimed_is_taken_back_not_given_up(client: redis.Redis) -> None:
    # Redis away longer than the lease TTL: the key is gone when the worker renews, and nobody
    # else holds the job. Answering "lost" there left the job running forever with no worker.
    renew = client.register_script(scripts.RENEW)
    lease = keys.lease("expired-job")
    client.delete(lease)
    assert renew(keys=[lease], args=["w1", LEASE_MS]) == 1
    assert client.get(lease) == "w1"
    assert 0 < client.pttl(lease) <= LEASE_MS


def test_a_lease_held_by_another_worker_is_lost(client: redis.Redis) -> None:
    renew = client.register_script(scripts.RENEW)
    lease = keys.lease("claimed-job")
    client.set(lease, "w2", px=LEASE_MS)
    assert renew(keys=[lease], args=["w1", LEASE_MS]) == 0
    assert client.get(lease) == "w2"  # untouched


def test_renewing_ones_own_lease_extends_it(client: redis.Redis) -> None:
    renew = client.register_script(scripts.RENEW)
    lease = keys.lease("own-job")
    client.set(lease, "w1", px=100)
    assert renew(keys=[lease], args=["w1", LEASE_MS]) == 1
    assert client.pttl(lease) > 100
