"""Readiness probe: `python -m services.worker.healthcheck` exits 0 if a worker on this host has
a fresh heartbeat in Redis (the key expires when it stops beating), else 1.

Reads Redis only; it must not import torch or the worker (probes run often and must be quick).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

import redis

from services.common import keys, lua_scripts
from services.common.settings import Settings


def fresh_workers(client: redis.Redis, host: str | None = None) -> list[dict]:
    """The heartbeats of live workers (on `host`, if given)."""
    fresh = client.register_script(lua_scripts.FRESH_WORKERS)
    beats = [json.loads(raw) for raw in fresh(keys=[keys.WORKERS], args=[keys.worker("")])]
    return [beat for beat in beats if host is None or beat.get("host") == host]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--any-host", action="store_true", help="accept a worker on any host")
    args = parser.parse_args(argv)
    settings = Settings()
    client = redis.Redis.from_url(
        settings.redis_url, decode_responses=True, socket_connect_timeout=2, socket_timeout=2
    )
    try:
        workers = fresh_workers(client, None if args.any_host else socket.gethostname())
    except redis.RedisError as exc:
        print(f"unhealthy: Redis unavailable: {exc}", file=sys.stderr)
        return 1
    if not workers:
        print("unhealthy: no fresh worker heartbeat on this host", file=sys.stderr)
        return 1
    print(f"healthy: {', '.join(w['nodename'] for w in workers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
