"""What clients waiting on queued jobs cost the API's event streams, with and without parking.

A backlog of queued jobs, each with a client streaming its events (`GET /jobs/{id}/events`), beside
one running job whose worker appends a token chunk every 20 ms (the worker's flush interval). The
API's own stream code runs in this process against a real Redis: the router's SSE generators over
one EventHub, with queued streams parked (the default) and, as the peer, read every round
(`park_queued=False`), at each backlog size, one after the other in the same run. Measured: this
process's CPU per second (the API's share) and per chunk delivered (the writer shares the event
loop, so a saturated loop shows as fewer chunks), Redis's CPU per second, the XREADs Redis ran and
their mean time, and that the running job's client received every chunk.

    python scripts/bench_events.py                      # -> bench/events_cpu.json + .png
    python scripts/bench_events.py --quick --out /tmp/e.json              # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/bench_events.py`
    sys.path.insert(0, str(ROOT))

import redis as sync_redis  # noqa: E402

from scripts.bench_meta import provenance  # noqa: E402
from services.api.app import make_redis, make_stream_reader  # noqa: E402
from services.api.events import EventHub  # noqa: E402
from services.api.routers.jobs import _stream  # noqa: E402
from services.api.store import JobStore  # noqa: E402
from services.common import keys, scripts  # noqa: E402
from services.common.jobs import JobRecord, JobRequest  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from tests.helpers.redis_server import redis_server  # noqa: E402  (a real Redis, free port)

DEFAULT_OUT = ROOT / "bench" / "events_cpu.json"
CHUNK_EVERY_S = 0.02  # the worker's streamer flushes every 20 ms
CONNECT_BATCH = 250


async def wait_for(condition: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def redis_cpu_s(client: sync_redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def xread_stats(client: sync_redis.Redis) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_xread", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


async def drain(stream: Any, received: list[int], stop: asyncio.Event) -> None:
    """Consume one SSE generator as the client's connection would, counting token events."""
    async for event in stream:
        if event.event == "token":
            received[0] += 1
        if stop.is_set():
            break


async def measure(url: str, backlog: int, park: bool, seconds: float) -> dict[str, Any]:
    settings = Settings(redis_url=url)
    redis = make_redis(settings)
    hub = EventHub(redis, make_stream_reader(settings), park_queued=park)
    store = JobStore(redis, settings)
    stats = sync_redis.Redis.from_url(url, decode_responses=True)
    claim = redis.register_script(scripts.CLAIM)
    run_id = f"{'parked' if park else 'read'}-{backlog}"
    queued = [f"{run_id}-q{i}" for i in range(backlog)]
    live = f"{run_id}-live"
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in [*queued, live]:
            record = JobRecord.new(job_id, JobRequest(prompt="Once"))
            pipe.hset(keys.job(job_id), mapping=record.to_hash())
        await pipe.execute()
    await claim(**scripts.claim_call(live, "bench", now=0, lease_ttl_s=60, ttl_s=3600))

    stop = asyncio.Event()
    received = [0]
    idle_counts = [0]
    clients = []
    for start in range(0, backlog, CONNECT_BATCH):  # clients arrive over time, not all at once
        clients += [asyncio.create_task(drain(_stream(store, hub, j, "0-0"), idle_counts, stop))
                    for j in queued[start:start + CONNECT_BATCH]]  # fmt: skip
        await wait_for(lambda: hub.open_subscriptions >= len(clients), "clients subscribed")
    clients.append(asyncio.create_task(drain(_stream(store, hub, live, "0-0"), received, stop)))
    await wait_for(lambda: hub.open_subscriptions == backlog + 1, "the live client subscribed")
    await asyncio.sleep(0.5)  # the first rounds (and any sweep) behind us

    calls0, usec0 = xread_stats(stats)
    redis0, cpu0, wall0 = redis_cpu_s(stats), time.process_time(), time.perf_counter()
    chunks = 0
    while time.perf_counter() - wall0 < seconds:
        await redis.xadd(keys.events(live), {"type": "token", "text": "x", "tokens": "1"})
        chunks += 1
        await asyncio.sleep(CHUNK_EVERY_S)
    await redis.xadd(keys.events(live), {"type": "done", "status": "succeeded"})
    deadline = time.perf_counter() + 10
    while received[0] < chunks and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    wall = time.perf_counter() - wall0
    api_cpu, redis_cpu = time.process_time() - cpu0, redis_cpu_s(stats) - redis0
    calls, usec = (a - b for a, b in zip(xread_stats(stats), (calls0, usec0)))

    stop.set()
    for task in clients:
        task.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    await hub.close()
    await redis.aclose()
    stats.close()
    return {
        "backlog": backlog, "parked": park, "seconds": round(wall, 2), "chunks": chunks,
        "received": received[0], "api_cpu_per_s": round(api_cpu / wall, 4),
        "api_cpu_ms_per_chunk": round(1000 * api_cpu / max(received[0], 1), 2),
        "redis_cpu_per_s": round(redis_cpu / wall, 4), "xread_calls": calls,
        "xread_us_mean": round(usec / max(calls, 1), 1),
    }  # fmt: skip


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per backlog: read-every-round over parked, for the API's CPU and Redis's XREAD time."""
    out = {}
    for row in rows:
        if row["parked"]:
            peer = next(r for r in rows if r["backlog"] == row["backlog"] and not r["parked"])
            out[str(row["backlog"])] = {
                "api_cpu_read_vs_parked": round(peer["api_cpu_per_s"] / row["api_cpu_per_s"], 2),
                "api_cpu_per_chunk_read_vs_parked": round(
                    peer["api_cpu_ms_per_chunk"] / row["api_cpu_ms_per_chunk"], 2),
                "xread_us_read_vs_parked": round(peer["xread_us_mean"] / row["xread_us_mean"], 2),
            }
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, (ax_api, ax_redis) = plt.subplots(1, 2, figsize=(10, 4))
    for park, label, color in ((False, "every stream read each round", "tab:gray"),
                               (True, "queued streams parked", "tab:blue")):  # fmt: skip
        mine = sorted((r for r in rows if r["parked"] == park), key=lambda r: r["backlog"])
        xs = [r["backlog"] for r in mine]
        ax_api.plot(xs, [r["api_cpu_ms_per_chunk"] for r in mine], "o-", label=label, color=color)
        ax_redis.plot(xs, [r["xread_us_mean"] for r in mine], "o-", label=label, color=color)
    ax_api.set(xlabel="clients streaming queued jobs", ylabel="API CPU ms per chunk delivered",
               title="API CPU per token chunk of the one running job")  # fmt: skip
    ax_redis.set(xlabel="clients streaming queued jobs", ylabel="µs per XREAD",
                 title="Redis time per XREAD")  # fmt: skip
    for ax in (ax_api, ax_redis):
        ax.set_xscale("symlog", linthresh=100)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def run(backlogs: list[int], seconds: float) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp), appendonly=False) as srv:
        for backlog in backlogs:
            for park in (False, True):
                row = await measure(srv.url, backlog, park, seconds)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", type=int, nargs="+", default=[0, 100, 1000, 5000])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="backlogs 0 and 50, 1 s (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.backlogs, args.seconds = [0, 50], 1.0
    rows = asyncio.run(run(args.backlogs, args.seconds))
    report = {
        **provenance(__file__, argv),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "settings": {"chunk_every_s": CHUNK_EVERY_S, "seconds": args.seconds},
        "results": rows,
        "ratios": summarize(rows),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report["ratios"], indent=2))
    return report


if __name__ == "__main__":
    main()
