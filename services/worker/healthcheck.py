"""Worker probe: `python -m services.worker.healthcheck` exits 0 if a worker on this host has a
fresh heartbeat in Redis (the key expires when it stops beating) whose engine is not stalled,
else 1. `--live` (the liveness probe) also passes while Redis cannot be reached, or refuses writes
at its maxmemory (the heartbeat could not be written): neither is this worker's fault, and
restarting it would only kill the jobs it is carrying through it.

Reads Redis only; it must not import torch or the worker (probes run often and must be quick).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

import redis

from services.common import keys, lua_scripts
from services.common.redis_memory import MemoryUse
from services.common.settings import Settings


def fresh_workers(client: redis.Redis, host: str | None = None) -> list[dict]:
    """The heartbeats of live workers (on `host`, if given)."""
    fresh = client.register_script(lua_scripts.FRESH_WORKERS)
    beats = [json.loads(raw) for raw in fresh(keys=[keys.WORKERS], args=[keys.worker("")])]
    return [beat for beat in beats if host is None or beat.get("host") == host]


def refusing_writes(client: redis.Redis) -> str | None:
    """Why Redis refuses writes for memory (used_memory at maxmemory under noeviction), or None.
    A Redis that denies INFO (an ACL) says nothing: a missing heartbeat then fails as before."""
    try:
        info = client.info("memory")
    except redis.ResponseError:
        return None
    use = MemoryUse.from_info(info)
    if use.over(1.0):
        return (f"Redis is at its maxmemory ({use.used} of {use.cap} bytes, noeviction) and "
                "refuses writes: the heartbeat could not be written")  # fmt: skip
    return None


def stalled(beat: dict, stall_s: float) -> bool:
    """Whether a heartbeat reports an engine with work and no step for over `stall_s` (the worker
    drops its heartbeat when it sees this itself: this catches a beat written just before)."""
    return float(beat.get("progress_age_s", 0.0)) > stall_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--any-host", action="store_true", help="accept a worker on any host")
    parser.add_argument("--live", action="store_true",
                        help="liveness: pass while Redis is unreachable or full")  # fmt: skip
    args = parser.parse_args(argv)
    settings = Settings()
    client = redis.Redis.from_url(
        settings.redis_url, decode_responses=True, socket_connect_timeout=2, socket_timeout=2
    )
    try:
        workers = fresh_workers(client, None if args.any_host else socket.gethostname())
        full = None if workers else refusing_writes(client)
    except redis.RedisError as exc:
        print(f"{'alive' if args.live else 'unhealthy'}: Redis unavailable: {exc}",
              file=sys.stderr)  # fmt: skip
        return 0 if args.live else 1
    if full:
        print(f"{'alive' if args.live else 'unhealthy'}: {full}", file=sys.stderr)
        return 0 if args.live else 1
    if not workers:
        print("unhealthy: no fresh worker heartbeat on this host", file=sys.stderr)
        return 1
    healthy = [w for w in workers if not stalled(w, settings.engine_stall_s)]
    if not healthy:
        ages = ", ".join(f"{w['nodename']} {w['progress_age_s']:.0f} s" for w in workers)
        print(f"unhealthy: engine stalled (no step finished with work waiting: {ages}; "
              f"LLM_ENGINE_STALL_S={settings.engine_stall_s:g})", file=sys.stderr)  # fmt: skip
        return 1
    print(f"healthy: {', '.join(w['nodename'] for w in healthy)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
