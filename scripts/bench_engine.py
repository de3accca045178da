"""CPU benchmark of lmcore's continuous-batching engine against static batches and one at a time.

The same 64 sampled requests (ragged prompts of 8-64 tokens, 16-128 new tokens, a seed each:
requests of mixed lengths, as a server sees them), the `small` preset with random
weights laid out as `load_model_dir` serves them, one thread, three ways in one run, interleaved:
- `engine`: Engine(max_batch=32), requests join as slots free up (what a serving worker runs);
- `static`: generate_ids over two fixed batches of 32 (a batch ends when its longest row does);
- `one_at_a_time`: Engine(max_batch=1).
Every way must produce the same tokens for the same seed; the JSON says whether they did.
Two more ways run the engine on the same requests with other filters, each against `engine`:
`engine_top_p` samples with top_p=0.9 in place of top_k=50 (what a client that sends only
top_p gets: the API leaves top-k off by default), `engine_top_k_1000` with top_k=1000: what
a nucleus request, and a wide top-k, cost against the usual top-k.

    python scripts/bench_engine.py              # -> bench/engine_cpu.json + .png
    python scripts/bench_engine.py --quick --out /tmp/e.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/bench_engine.py`
    sys.path.insert(0, str(ROOT))

from lmcore.config import preset  # noqa: E402
from lmcore.engine import Engine, EngineRequest  # noqa: E402
from lmcore.generate import SamplingParams, generate_ids  # noqa: E402
from lmcore.inference_layout import use_inference_layout  # noqa: E402
from lmcore.model import Transformer  # noqa: E402
from scripts.bench_lmcore import cpu_model  # noqa: E402
from scripts.bench_meta import provenance  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "engine_cpu.json"


@dataclass(frozen=True)
class Workload:
    requests: int = 64
    max_batch: int = 32
    new_min: int = 16
    new_max: int = 128
    prompt_min: int = 8
    prompt_max: int = 64
    reps: int = 3
    model: str = "small"
    seed: int = 0
    top_p: float = 0.9  # for the engine_top_p way
    wide_top_k: int = 1000  # for the engine_top_k_1000 way


FULL = Workload()
QUICK = Workload(requests=8, max_batch=4, new_min=4, new_max=12, prompt_max=16, reps=1,
                 model="tiny")

Run = Callable[[], list[list[int]]]  # token ids per request


def make_requests(w: Workload, vocab: int) -> tuple[list[list[int]], list[SamplingParams]]:
    gen = torch.Generator().manual_seed(w.seed)
    lengths = torch.randint(w.prompt_min, w.prompt_max + 1, (w.requests,), generator=gen)
    prompts = [torch.randint(1, vocab, (int(n),), generator=gen).tolist() for n in lengths]
    new = torch.randint(w.new_min, w.new_max + 1, (w.requests,), generator=gen).tolist()
    params = [SamplingParams(max_new_tokens=n, temperature=0.8, top_k=50, seed=i, eos=False)
              for i, n in enumerate(new)]  # fmt: skip
    return prompts, params


def engine_run(model: Transformer, max_batch: int, max_len: int, prompts: list[list[int]],
               params: list[SamplingParams]) -> Run:  # fmt: skip
    def run() -> list[list[int]]:
        engine = Engine(model, max_batch=max_batch, max_len=max_len)
        handles = [engine.submit(EngineRequest(p, sp)) for p, sp in zip(prompts, params)]
        while engine.step():  # driven on this thread: no hand-off to time
            pass
        return [h.result(timeout=0).token_ids for h in handles]

    return run


def static_run(model: Transformer, max_batch: int, prompts: list[list[int]],
               params: list[SamplingParams]) -> Run:  # fmt: skip
    def run() -> list[list[int]]:
        out: list[list[int]] = []
        for i in range(0, len(prompts), max_batch):
            batch = generate_ids(model, prompts[i : i + max_batch], params[i : i + max_batch],
                                 eos_id=None)  # fmt: skip
            out += [g.token_ids for g in batch]
        return out

    return run


def measure(runs: dict[str, Run], reps: int, tokens: int,
            compared: tuple[str, ...]) -> tuple[dict[str, Any], bool]:  # fmt: skip
    """Interleaved reps after one warm-up each; rows per way and whether the compared ways
    (those sampling alike) agreed."""
    outputs = {name: run() for name, run in runs.items()}  # warm-up, and the tokens to compare
    same = all(outputs[name] == outputs["engine"] for name in compared)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    rows = {name: {"tokens_per_s": tokens / statistics.median(t), "median_s": statistics.median(t),
                   "runs_s": [round(x, 3) for x in t]} for name, t in times.items()}  # fmt: skip
    return rows, same


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = list(rows)
    ax.bar(names, [rows[n]["tokens_per_s"] for n in names],
           color=["#2a7", "#68c", "#999", "#c84", "#b6b"][: len(names)])  # fmt: skip
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("tokens/s")
    w = report["workload"]
    ax.set_title(f"{w['requests']} sampled requests x {w['new_min']}-{w['new_max']} tokens, "
                 f"max_batch {w['max_batch']}, {w['model']} (random)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 requests (smoke run)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/engine_cpu.json)")
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error("--quick needs --out (keeps the committed bench/ results untouched)")
    w = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    torch.manual_seed(w.seed)
    model = Transformer(preset(w.model)).eval()
    use_inference_layout(model)
    prompts, params = make_requests(w, model.config.vocab_size)
    max_len = w.prompt_max + w.new_max
    runs = {
        "engine": engine_run(model, w.max_batch, max_len, prompts, params),
        "static": static_run(model, w.max_batch, prompts, params),
        "one_at_a_time": engine_run(model, 1, max_len, prompts, params),
        "engine_top_p": engine_run(model, w.max_batch, max_len, prompts,
                                   [replace(p, top_k=0, top_p=w.top_p) for p in params]),
        f"engine_top_k_{w.wide_top_k}": engine_run(model, w.max_batch, max_len, prompts,
                                                   [replace(p, top_k=w.wide_top_k)
                                                    for p in params]),  # fmt: skip
    }
    started = time.perf_counter()
    with torch.inference_mode():
        # eos is off, so every request makes exactly its max_new_tokens.
        results, same = measure(runs, w.reps, sum(p.max_new_tokens for p in params),
                                compared=("static", "one_at_a_time"))
    report = {
        "workload": asdict(w),
        "results": results,
        "ratios": {"engine_vs_static": results["engine"]["tokens_per_s"]
                   / results["static"]["tokens_per_s"],
                   "engine_vs_one_at_a_time": results["engine"]["tokens_per_s"]
                   / results["one_at_a_time"]["tokens_per_s"],
                   "engine_top_p_vs_engine": results["engine_top_p"]["tokens_per_s"]
                   / results["engine"]["tokens_per_s"],
                   f"engine_top_k_{w.wide_top_k}_vs_engine":
                   results[f"engine_top_k_{w.wide_top_k}"]["tokens_per_s"]
                   / results["engine"]["tokens_per_s"]},  # fmt: skip
        "checks": {"same_tokens_every_way": same},
        "meta": {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 **provenance(__file__, argv),
                 "torch": torch.__version__, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                 "threads": 1, "wall_s": round(time.perf_counter() - started, 1),
                 "timing": "median of interleaved reps after one warm-up run each; the engine "
                           "is stepped on the calling thread"},  # fmt: skip
    }
    out = args.out or DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps({"ratios": report["ratios"], "checks": report["checks"],
                      "tokens_per_s": {n: round(r["tokens_per_s"]) for n, r in results.items()},
                      "out": str(out)}, indent=2))  # fmt: skip
    if not same:
        raise SystemExit("the three ways produced different tokens for the same seeds")
    return report


if __name__ == "__main__":
    main()
