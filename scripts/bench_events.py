"""What clients waiting on queued jobs cost the API's event streams, with and without parking.

A backlog of queued jobs, each with a client streaming its events (`GET /jobs/{id}/events`), beside
one running job to which a writer appends a token chunk every 20 ms (the worker's flush interval).
The API's own stream code runs in this process against a real Redis: the router's SSE generators
over one EventHub, with queued streams parked (the default) and, as the peer, read every round
(`park_queued=False`), at each backlog size. The writer is a process of its own, as the worker
is, with its own Redis client and a fixed schedule, so the chunk rate is the same whatever the
API's event loop is doing. Rounds repeat every pair with the order of the two modes alternated
(by backlog and by round), and the summary takes medians over rounds.

Measured over each window, per second: this process's CPU (the API's share), Redis's CPU, the
time Redis spent in XREADs (calls x mean time / window); and each chunk's delivery lag, from
the writer's XADD to the running job's client receiving it (both on CLOCK_MONOTONIC), and that
the client received every chunk.

    python scripts/bench_events.py                      # -> bench/events_cpu.json + .png
    python scripts/bench_events.py --quick --out /tmp/e.json              # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import statistics
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
from services.common import keys, lua_scripts  # noqa: E402
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


# The running job's worker: a process of its own that XADDs a chunk on a fixed schedule (not
# "sleep after each write", which a slow Redis would stretch) once told to go, then `done`;
# it prints each chunk's write time (time.monotonic, CLOCK_MONOTONIC: one clock for both
# processes).
WRITER = r"""
import json, sys, time
import redis
url, stream, seconds, every = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
client = redis.Redis.from_url(url)
client.ping()
print("ready", flush=True)
sys.stdin.readline()
start, written = time.monotonic(), []
while len(written) * every < seconds:
    due = start + len(written) * every
    now = time.monotonic()
    if due > now:
        time.sleep(due - now)
    written.append(time.monotonic())
    client.xadd(stream, {"type": "token", "text": "x", "tokens": "1"})
client.xadd(stream, {"type": "done", "status": "succeeded"})
print(json.dumps({"written": written}), flush=True)
"""


async def drain(stream: Any, received: list[float], stop: asyncio.Event) -> None:
    """Consume one SSE generator as the client's connection would, noting when each token
    event arrived."""
    async for event in stream:
        if event.event == "token":
            received.append(time.monotonic())
        if stop.is_set():
            break


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def measure(
    url: str, backlog: int, park: bool, seconds: float, rnd: int = 0
) -> dict[str, Any]:
    settings = Settings(redis_url=url)
    redis = make_redis(settings)
    hub = EventHub(redis, make_stream_reader(settings), park_queued=park)
    store = JobStore(redis, settings)
    stats = sync_redis.Redis.from_url(url, decode_responses=True)
    claim = redis.register_script(lua_scripts.CLAIM)
    run_id = f"{'parked' if park else 'read'}-{backlog}-r{rnd}"
    queued = [f"{run_id}-q{i}" for i in range(backlog)]
    live = f"{run_id}-live"
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in [*queued, live]:
            record = JobRecord.new(job_id, JobRequest(prompt="Once"))
            pipe.hset(keys.job(job_id), mapping=record.to_hash())
        await pipe.execute()
    await claim(**lua_scripts.claim_call(live, "bench", now=0, lease_ttl_s=60, ttl_s=3600))

    stop = asyncio.Event()
    received: list[float] = []
    idle_counts: list[float] = []
    clients = []
    for start in range(0, backlog, CONNECT_BATCH):  # clients arrive over time, not all at once
        clients += [asyncio.create_task(drain(_stream(store, hub, j, "0-0"), idle_counts, stop))
                    for j in queued[start:start + CONNECT_BATCH]]  # fmt: skip
        await wait_for(lambda: hub.open_subscriptions >= len(clients), "clients subscribed")
    clients.append(asyncio.create_task(drain(_stream(store, hub, live, "0-0"), received, stop)))
    await wait_for(lambda: hub.open_subscriptions == backlog + 1, "the live client subscribed")
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, url, keys.events(live), str(seconds), str(CHUNK_EVERY_S),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert writer.stdin is not None and writer.stdout is not None
    if (await writer.stdout.readline()).strip() != b"ready":
        raise RuntimeError("the chunk writer did not start")
    await asyncio.sleep(0.5)  # the first rounds (and any sweep) behind us

    calls0, usec0 = xread_stats(stats)
    redis0, cpu0, wall0 = redis_cpu_s(stats), time.process_time(), time.perf_counter()
    writer.stdin.write(b"go\n")
    await writer.stdin.drain()
    written = json.loads(await writer.stdout.readline())["written"]
    await writer.wait()
    chunks = len(written)
    deadline = time.perf_counter() + 10
    while len(received) < chunks and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    wall = time.perf_counter() - wall0
    api_cpu, redis_cpu = time.process_time() - cpu0, redis_cpu_s(stats) - redis0
    calls, usec = (a - b for a, b in zip(xread_stats(stats), (calls0, usec0)))
    lag_ms = [1000 * (got - put) for got, put in zip(received, written)]

    stop.set()
    for task in clients:
        task.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    await hub.close()
    await redis.aclose()
    stats.close()
    return {
        "backlog": backlog, "parked": park, "round": rnd, "seconds": round(wall, 2),
        "chunks": chunks, "received": len(received),
        "api_cpu_s_per_s": round(api_cpu / wall, 4),
        "redis_cpu_s_per_s": round(redis_cpu / wall, 4), "xread_calls": calls,
        "xread_calls_per_s": round(calls / wall, 1),
        "xread_us_per_s": round(usec / wall, 1),
        # Not compared between modes: one XREAD reads a few streams parked, every stream not.
        "xread_us_mean": round(usec / max(calls, 1), 1),
        "lag_ms_p50": round(percentile(lag_ms, 0.5), 2),
        "lag_ms_p95": round(percentile(lag_ms, 0.95), 2),
        "lag_ms_max": round(max(lag_ms, default=0.0), 2),
    }  # fmt: skip


FIGURES = ("api_cpu_s_per_s", "redis_cpu_s_per_s", "xread_us_per_s", "xread_calls_per_s",
           "lag_ms_p50", "lag_ms_p95")  # fmt: skip


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per backlog and mode, each figure's median over the rounds."""
    out: dict[str, Any] = {}
    for backlog in sorted({r["backlog"] for r in rows}):
        for park, mode in ((False, "read"), (True, "parked")):
            mine = [r for r in rows if r["backlog"] == backlog and r["parked"] == park]
            out.setdefault(str(backlog), {})[mode] = {
                k: round(statistics.median(r[k] for r in mine), 4) for k in FIGURES}
    return out


def summarize(med: dict[str, Any]) -> dict[str, Any]:
    """Per backlog: read-every-round over parked, per second (and for the chunks' lag)."""
    def over(a: float, b: float) -> float:
        return round(a / b, 2) if b else float("nan")

    return {backlog: {f"{k}_read_vs_parked": over(m["read"][k], m["parked"][k])
                      for k in ("api_cpu_s_per_s", "redis_cpu_s_per_s", "xread_us_per_s",
                                "lag_ms_p50")}
            for backlog, m in med.items()}  # fmt: skip


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = report["medians"]
    xs = sorted(int(b) for b in med)
    fig, (ax_api, ax_redis, ax_lag) = plt.subplots(1, 3, figsize=(15, 4))
    for mode, label, color in (("read", "every stream read each round", "tab:gray"),
                               ("parked", "queued streams parked", "tab:blue")):  # fmt: skip
        def ys(key: str, mode: str = mode) -> list[float]:
            return [med[str(x)][mode][key] for x in xs]

        ax_api.plot(xs, ys("api_cpu_s_per_s"), "o-", label=label, color=color)
        ax_redis.plot(xs, [v / 1000 for v in ys("xread_us_per_s")], "o-", label=label,
                      color=color)  # fmt: skip
        ax_lag.plot(xs, ys("lag_ms_p50"), "o-", label=f"{label}, p50", color=color)
        ax_lag.plot(xs, ys("lag_ms_p95"), "o--", label=f"{label}, p95", color=color, alpha=0.6)
    ax_api.set(xlabel="clients streaming queued jobs", ylabel="API CPU seconds per second",
               title="API CPU (medians over rounds)")  # fmt: skip
    ax_redis.set(xlabel="clients streaming queued jobs", ylabel="ms of XREAD per second",
                 title="Redis time in XREADs per second")  # fmt: skip
    ax_lag.set(xlabel="clients streaming queued jobs", ylabel="ms",
               title="running job's chunks: XADD to client")  # fmt: skip
    ax_lag.set_yscale("log")
    for ax in (ax_api, ax_redis, ax_lag):
        ax.set_xscale("symlog", linthresh=100)
        ax.set_xlim(-10, 1.5 * max(xs))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def run(backlogs: list[int], seconds: float, rounds: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp), appendonly=False) as srv:
        for rnd in range(rounds):
            for i, backlog in enumerate(backlogs):
                # Read first on even (backlog, round) pairs, parked first on odd ones.
                order = (False, True) if (i + rnd) % 2 == 0 else (True, False)
                for position, park in enumerate(order):
                    row = await measure(srv.url, backlog, park, seconds, rnd)
                    row["ran"] = "first" if position == 0 else "second"
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", type=int, nargs="+", default=[0, 100, 1000, 5000])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2,
                        help="pairs per backlog, the order of the two modes alternated")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true",
                        help="backlogs 0 and 50, 1 s, one round (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.backlogs, args.seconds, args.rounds = [0, 50], 1.0, 1
    rows = asyncio.run(run(args.backlogs, args.seconds, args.rounds))
    med = medians(rows)
    report = {
        **provenance(__file__, argv),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "settings": {"chunk_every_s": CHUNK_EVERY_S, "seconds": args.seconds,
                     "rounds": args.rounds, "backlogs": args.backlogs,
                     "writer": "a separate process, its own Redis client, fixed schedule"},
        "results": rows,
        "medians": med,
        "ratios": summarize(med),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report["ratios"], indent=2))
    return report


if __name__ == "__main__":
    main()
