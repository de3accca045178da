"""Serving benchmark on CPU: concurrent jobs through API -> Redis -> worker, batched vs one by one.

Starts the local stack (Redis, worker, API; no MLflow) twice over the same `small` model dir
(random weights, a real tokenizer), with LLM_MAX_BATCH=32 and LLM_MAX_BATCH=1, and measures from
the client: jobs/s, tokens/s, end-to-end latency, and queue overhead (end-to-end minus the time
the job spent in the worker's engine). Ratios matter more than absolute numbers on a shared CPU.

    python scripts/bench_serve.py                    # -> bench/serve_cpu.json + bench/serve_cpu.png
    python scripts/bench_serve.py --jobs 8 --tokens 8 --out /tmp/s.json   # a quick smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/bench_serve.py`
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from scripts.bench_meta import provenance  # noqa: E402
from services.stack import Stack, StackConfig  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "serve_cpu.json"
TARGETS = {"batched_vs_single_tokens_per_s": 4.0, "queue_overhead_p50_ms": 15.0}
SOLO_JOBS = 16  # sequential jobs after the burst: overhead with nothing else in flight


def make_small_model(path: Path, seed: int = 0) -> Path:
    """The `small` preset with random weights and a tokenizer trained on part of the corpus."""
    import torch

    from lmcore.checkpoint import save_model_dir
    from lmcore.config import preset
    from lmcore.data import read_corpus
    from lmcore.model import Transformer
    from lmcore.tokenizer import Tokenizer

    docs = read_corpus()[:4]
    tokenizer = Tokenizer.train(docs, vocab_size=8192)
    torch.manual_seed(seed)
    model = Transformer(preset("small", vocab_size=tokenizer.vocab_size)).eval()
    return save_model_dir(path, model, tokenizer, {"name": "small-random", "version": "bench"})


async def one_job(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    # Wall-clock time, so it compares with the job record's timestamps (same machine).
    start = time.time()
    resp = await client.post("/jobs", json=body)
    resp.raise_for_status()
    job_id = resp.json()["id"]
    done: dict[str, Any] | None = None
    async with client.stream("GET", f"/jobs/{job_id}/events") as events:
        kind = None
        async for line in events.aiter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind == "done":
                done = json.loads(line.split(":", 1)[1])
                break
    end = time.time()
    assert done is not None and done["status"] == "succeeded", done
    return {"start": start, "end": end, "e2e_s": end - start, "job": done}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RedisLoad:
    """What the burst asked of Redis: commands (all, and the XREADs behind event streams) and
    the most clients connected at once, sampled every 20 ms."""

    def __init__(self, url: str) -> None:
        import redis.asyncio

        self._redis = redis.asyncio.Redis.from_url(url, decode_responses=True)
        self._peak_clients = 0
        self._task: asyncio.Task[None] | None = None

    async def _counts(self) -> tuple[int, int]:
        stats = await self._redis.info("stats")
        commands = await self._redis.info("commandstats")
        return int(stats["total_commands_processed"]), int(
            commands.get("cmdstat_xread", {}).get("calls", 0)
        )

    async def _sample(self) -> None:
        while True:
            clients = await self._redis.info("clients")
            self._peak_clients = max(self._peak_clients, int(clients["connected_clients"]))
            await asyncio.sleep(0.02)

    async def start(self) -> None:
        self._before = await self._counts()
        self._task = asyncio.create_task(self._sample())

    async def stop(self) -> dict[str, int]:
        assert self._task is not None
        self._task.cancel()
        after = await self._counts()
        await self._redis.aclose()
        return {"commands": after[0] - self._before[0], "xread_calls": after[1] - self._before[1],
                "peak_connected_clients": self._peak_clients}  # fmt: skip


async def run_load(
    api_url: str, jobs: int, tokens: int, seed0: int, pids: dict[str, int], redis_url: str
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=2 * jobs + 4, max_keepalive_connections=2 * jobs)
    async with httpx.AsyncClient(base_url=api_url, timeout=600, limits=limits) as client:
        # Warm-up: one burst of short jobs the size of the measured one, so what a serving stack
        # has after its first minutes (client and API connections, the worker's pool threads and
        # Redis connections, oneDNN's kernels for these shapes) exists before it is measured.
        # A cold stack queued its first burst about twice as long.
        warm = [{"prompt": f"Citizen {i}: speak,", "max_new_tokens": 4, "eos": False, "seed": i}
                for i in range(jobs)]  # fmt: skip
        await asyncio.gather(*(one_job(client, body) for body in warm))
        bodies = [
            {"prompt": f"Citizen {i}: speak,", "max_new_tokens": tokens, "seed": seed0 + i,
             "eos": False, "temperature": 0.8}  # fmt: skip
            for i in range(jobs)
        ]
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        redis_load = RedisLoad(redis_url)
        await redis_load.start()
        client_before = time.process_time()
        results = await asyncio.gather(*(one_job(client, b) for b in bodies))
        redis_burst = await redis_load.stop()
        cpu = {name: (None if cpu_seconds(pid) is None or cpu_before[name] is None
                      else round(cpu_seconds(pid) - cpu_before[name], 3))  # type: ignore[operator]
               for name, pid in pids.items()}  # fmt: skip
        cpu["client (this process)"] = round(time.process_time() - client_before, 3)
        # The same path with nothing else in flight: the per-job overhead floor.
        alone = [await one_job(client, {**b, "seed": seed0 + 10_000 + i})
                 for i, b in enumerate(bodies[:SOLO_JOBS])]  # fmt: skip
    summary = summarize(results, tokens)
    # Where the cores went during the burst: every process here shares the same CPUs.
    summary["burst_cpu_s_by_process"] = cpu
    summary["burst_redis"] = redis_burst  # sampling adds ~50 INFO commands a second
    solo = summarize(alone, tokens)
    summary["one_at_a_time_client"] = {
        "jobs": len(alone), "latency_ms": solo["latency_ms"],
        "queue_overhead_ms": solo["queue_overhead_ms"],
        "queue_overhead_phases_p50_ms": solo["queue_overhead_phases_p50_ms"],
    }  # fmt: skip
    return summary


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(results: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    e2e = [r["e2e_s"] for r in results]
    engine = [r["job"]["timings"]["engine_s"] for r in results]
    overhead = [a - b for a, b in zip(e2e, engine)]
    phases = overhead_phases(results)
    ttft = [r["job"]["timings"]["time_to_first_token_s"] for r in results]
    generated = sum(r["job"]["result"]["completion_tokens"] for r in results)
    assert generated == tokens * len(results), "every job must produce exactly its tokens"

    def ms(values: list[float]) -> dict[str, float]:
        return {f"p{int(q * 100)}": round(pct(values, q) * 1000, 2) for q in (0.5, 0.95, 0.99)}

    return {
        "jobs": len(results),
        "tokens_per_job": tokens,
        "wall_s": round(wall, 3),
        "jobs_per_s": round(len(results) / wall, 3),
        "tokens_per_s": round(generated / wall, 1),
        "latency_ms": ms(e2e),
        "time_to_first_token_ms": ms(ttft),
        "engine_ms": ms(engine),
        "queue_overhead_ms": {**ms(overhead), "mean": round(statistics.mean(overhead) * 1000, 2)},
        # The overhead's four parts, which add up to it job by job.
        "queue_overhead_phases_p50_ms": {k: round(pct(v, 0.5) * 1000, 2)
                                         for k, v in phases.items()},
    }


def overhead_phases(results: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per job: client to record created (the API), created to claimed by a worker (Redis and
    Celery), time in the worker outside the engine, and the final record to the client (SSE)."""
    phases: dict[str, list[float]] = {
        "api_admission": [], "queue_to_worker": [], "worker_outside_engine": [],
        "result_to_client": [],
    }  # fmt: skip
    for r in results:
        t = r["job"]["timings"]
        created, started, finished = (
            dt.datetime.fromisoformat(t[k]).timestamp()
            for k in ("created_at", "started_at", "finished_at")
        )
        phases["api_admission"].append(created - r["start"])
        phases["queue_to_worker"].append(started - created)
        phases["worker_outside_engine"].append(finished - started - t["engine_s"])
        phases["result_to_client"].append(r["end"] - finished)
    return phases


def run_mode(
    model_dir: Path, root: Path, max_batch: int, jobs: int, tokens: int, threads: int
) -> dict[str, Any]:
    config = StackConfig(
        root=root / f"batch{max_batch}", model_uri=str(model_dir), mlflow=False, api_port=0,
        redis_port=0, max_batch=max_batch, worker_concurrency=jobs + 4,
        extra_env={"OMP_NUM_THREADS": str(threads), "LLM_MAX_NEW_TOKENS": str(max(tokens, 64))},
    )  # fmt: skip
    stack = Stack(config)
    state = stack.up(detach=True, echo=False)
    try:
        print(f"max_batch={max_batch}: {jobs} jobs x {tokens} tokens ...", flush=True)
        result = asyncio.run(run_load(state.api_url, jobs, tokens, seed0=1000, pids=state.pids,
                                      redis_url=state.redis_url))
    finally:
        stack.down()
    print(f"  {result['tokens_per_s']} tokens/s, {result['jobs_per_s']} jobs/s, "
          f"p50 {result['latency_ms']['p50']} ms, "
          f"queue overhead p50 {result['queue_overhead_ms']['p50']} ms in the burst, "
          f"{result['one_at_a_time_client']['queue_overhead_ms']['p50']} ms alone", flush=True)
    return result


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = report["results"]
    names = list(modes)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(names, [modes[n]["tokens_per_s"] for n in names], color=["#2a7", "#999"])
    axes[0].set_title(f"tokens/s: {report['batched_vs_single_tokens_per_s']}x with batching")
    for i, q in enumerate(("p50", "p95", "p99")):
        axes[1].bar([x + i * 0.25 for x in range(len(names))],
                    [modes[n]["latency_ms"][q] / 1000 for n in names], width=0.25, label=q)
    axes[1].set_xticks([x + 0.25 for x in range(len(names))], names)
    axes[1].set_title("end-to-end latency (s)")
    axes[1].legend()
    for i, q in enumerate(("p50", "p95", "p99")):
        axes[2].bar([x + i * 0.25 for x in range(len(names))],
                    [modes[n]["queue_overhead_ms"][q] for n in names], width=0.25, label=q)
    axes[2].scatter([x + 0.25 for x in range(len(names))],
                    [modes[n]["one_at_a_time_client"]["queue_overhead_ms"]["p50"] for n in names],
                    color="k", marker="x", zorder=3, label="p50, one job in flight")
    axes[2].axhline(TARGETS["queue_overhead_p50_ms"], color="r", ls="--", lw=1,
                    label="p50 target")  # fmt: skip
    axes[2].set_yscale("log")
    axes[2].set_xticks([x + 0.25 for x in range(len(names))], names)
    axes[2].set_title("queue overhead: end-to-end - engine (ms)")
    axes[2].legend(fontsize=7, loc="center right", framealpha=0.9)
    cfg = report["config"]
    fig.suptitle(f"{cfg['jobs']} concurrent jobs x {cfg['tokens']} new tokens, small model, "
                 f"API -> Redis -> worker on {report['machine']['cpus']} CPUs")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="LLM_MAX_BATCH of the batched run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the worker")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from --out's JSON")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        model_dir = make_small_model(root / "model")
        results = {
            f"batch{args.batch}": run_mode(model_dir, root, args.batch, args.jobs, args.tokens,
                                           args.threads),  # fmt: skip
            "batch1": run_mode(model_dir, root, 1, args.jobs, args.tokens, args.threads),
        }
    batched, single = results[f"batch{args.batch}"], results["batch1"]
    speedup = batched["tokens_per_s"] / single["tokens_per_s"]
    overhead = batched["queue_overhead_ms"]["p50"]
    overhead_alone = batched["one_at_a_time_client"]["queue_overhead_ms"]["p50"]
    import torch

    report = {
        **provenance(__file__, argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_avg_1m": round(os.getloadavg()[0], 2)},  # fmt: skip
        "config": {"jobs": args.jobs, "tokens": args.tokens, "batch": args.batch,
                   "torch_threads": args.threads, "model": "small (random weights)",
                   "client": "httpx: POST /jobs then SSE /jobs/{id}/events until done"},
        "results": results,
        "batched_vs_single_tokens_per_s": round(speedup, 2),
        "targets": {
            "batched_vs_single_tokens_per_s": {"target": ">= 4.0", "value": round(speedup, 2),
                                               "met": speedup >= 4.0},
            "queue_overhead_p50_ms": {"target": "<= 15", "value": overhead,
                                      "met": overhead <= TARGETS["queue_overhead_p50_ms"],
                                      "note": f"{args.jobs} jobs submitted at once"},
            "queue_overhead_p50_ms_one_job_in_flight": {
                "target": "<= 15", "value": overhead_alone,
                "met": overhead_alone <= TARGETS["queue_overhead_p50_ms"],
                "note": f"{SOLO_JOBS} sequential jobs after the burst, same stack"},
        },  # fmt: skip
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report["targets"], indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
