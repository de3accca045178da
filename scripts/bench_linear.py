"""CPU benchmark of lmcore's linear layer: oneDNN against F.linear (MKL), and decode weight layouts.

Two questions behind lmcore.linear, answered side by side in one run, fp32, one thread:
- training-sized GEMMs (forward, grad-input, grad-weight): GFLOP/s through F.linear's BLAS and
  through oneDNN (`lmcore.linear.onednn_linear`); `meta.lmcore_gemm` says which of the two
  lmcore uses on this machine;
- one-row products (a batch-1 decode step): microseconds per weight for oneDNN and the BLAS on a
  row-major and a column-major weight, and the embedding-bag sum on a column-major one (the
  candidates lmcore.inference_layout times on a model), with enough copies of each weight to
  overflow the last-level cache, as a model's weights do; beside them a plain sum of the same
  weights, the speed at which one core reads them.

    python scripts/bench_linear.py              # -> bench/linear_cpu.json + .png
    python scripts/bench_linear.py --quick --out /tmp/l.json
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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/bench_linear.py`
    sys.path.insert(0, str(ROOT))

from lmcore.linear import (  # noqa: E402
    bag_linear,
    cpu_vendor,
    onednn_enabled,
    onednn_linear,
    onednn_supported,
)
from scripts.bench_lmcore import cpu_model  # noqa: E402
from scripts.bench_meta import provenance  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "linear_cpu.json"
# (out_features, in_features) of the bench model (n_embd 384, GELU MLP, 8192 vocab) and gpt2-124m.
SHAPES = [(1152, 384), (384, 384), (1536, 384), (384, 1536), (8192, 384),
          (2304, 768), (768, 768), (3072, 768), (768, 3072)]  # fmt: skip
TOKENS = 1024  # rows of a training GEMM: batch 4 x 256, as bench_lmcore's train step
CACHE_BYTES = 96 * 2**20  # more than any last-level cache here: weights stream from memory


def per_call(fns: dict[str, Callable[[], Any]], reps: int, rounds: int = 5) -> dict[str, float]:
    """Median seconds per call of each fn over `rounds` rounds (after a warm-up of each): every
    round times `reps` calls of each fn in turn, each round starting one fn later than the last,
    so that a machine's drift falls on every fn alike and none always runs first."""
    for fn in fns.values():
        for _ in range(max(2, reps // 5)):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rnd in range(rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(reps):
                fns[name]()
            times[name].append((time.perf_counter() - start) / reps)
    return {name: statistics.median(t) for name, t in times.items()}


def gemm_rows(quick: bool) -> list[dict[str, Any]]:
    rows = []
    tokens = 64 if quick else TOKENS
    for out_f, in_f in SHAPES[:2] if quick else SHAPES:
        x, w = torch.randn(tokens, in_f), torch.randn(out_f, in_f)
        g = torch.randn(tokens, out_f)
        flops = 2 * tokens * in_f * out_f
        products = {  # name: (BLAS through F.linear / matmul, oneDNN)
            "forward x·Wᵀ": (lambda: F.linear(x, w), lambda: onednn_linear(x, w, None)),
            "grad input g·W": (lambda: g @ w, lambda: onednn_linear(g, w.t(), None)),
            "grad weight gᵀ·x": (lambda: g.t() @ x, lambda: onednn_linear(g.t(), x.t(), None)),
        }
        for name, (blas, onednn) in products.items():
            reps = 3 if quick else 10
            t = per_call({"blas": blas, "onednn": onednn}, reps)
            t_blas, t_onednn = t["blas"], t["onednn"]
            rows.append({"shape": [out_f, in_f], "tokens": tokens, "product": name,
                         "blas_gflops": flops / t_blas / 1e9,
                         "onednn_gflops": flops / t_onednn / 1e9,
                         "onednn_vs_blas": t_blas / t_onednn})  # fmt: skip
    return rows


def matvec_rows(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for out_f, in_f in SHAPES[:2] if quick else SHAPES:
        copies = max(2, CACHE_BYTES // (out_f * in_f * 4)) if not quick else 2
        row_major = [torch.randn(out_f, in_f) for _ in range(copies)]
        col_major = [w.t().contiguous().t() for w in row_major]
        x = torch.randn(1, in_f)

        def run(weights: list[torch.Tensor], fn: Callable) -> Callable[[], None]:
            return lambda: [fn(x, w, None) for w in weights]

        reps = 2 if quick else 20
        result: dict[str, Any] = {"shape": [out_f, in_f], "copies": copies}
        ways = {}
        for name, weights in (("row_major", row_major), ("column_major", col_major)):
            ways[f"onednn_{name}"] = run(weights, onednn_linear)
            ways[f"blas_{name}"] = run(weights, F.linear)
        ways["bag_column_major"] = run(col_major, bag_linear)
        # Not a candidate: reading the weights with no product at all, the bound of them all.
        ways["read"] = lambda: [w.sum() for w in row_major]
        seconds = per_call(ways, reps)
        for name in ways:
            if name != "read":
                result[f"{name}_us"] = seconds[name] / copies * 1e6
        read_us = seconds["read"] / copies * 1e6
        result["read_gb_per_s"] = out_f * in_f * 4 / read_us / 1e3
        result["column_vs_row_onednn"] = (result["onednn_row_major_us"]
                                          / result["onednn_column_major_us"])  # fmt: skip
        times = {k.removesuffix("_us"): v for k, v in result.items() if k.endswith("_us")}
        result["fastest"] = min(times, key=times.__getitem__)
        result["fastest_vs_onednn_row_major"] = times["onednn_row_major"] / times[result["fastest"]]
        result["fastest_gb_per_s"] = out_f * in_f * 4 / times[result["fastest"]] / 1e3
        rows.append(result)
    return rows


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_g, ax_m) = plt.subplots(1, 2, figsize=(14, 4.8))
    gemm = report["gemm"]
    labels = [f"{r['shape'][0]}x{r['shape'][1]}\n{r['product']}" for r in gemm]
    xs = range(len(gemm))
    ax_g.bar([x - 0.2 for x in xs], [r["blas_gflops"] for r in gemm], 0.4, label="F.linear (BLAS)")
    ax_g.bar([x + 0.2 for x in xs], [r["onednn_gflops"] for r in gemm], 0.4, label="oneDNN")
    ax_g.set_xticks(list(xs), labels, fontsize=6, rotation=60, ha="right")
    ax_g.set_ylabel("GFLOP/s")
    ax_g.set_title(f"fp32 GEMMs, {gemm[0]['tokens']} rows")
    ax_g.legend(fontsize=8)
    mv = report["matvec"]
    xs = range(len(mv))
    variants = ["onednn_row_major", "onednn_column_major", "blas_row_major", "blas_column_major",
                "bag_column_major"]  # fmt: skip
    for i, name in enumerate(variants):
        ax_m.bar([x + (i - 2) * 0.16 for x in xs], [r[f"{name}_us"] for r in mv], 0.16,
                 label=name.replace("_", " "))
    ax_m.set_xticks(list(xs), [f"{r['shape'][0]}x{r['shape'][1]}" for r in mv], fontsize=8)
    ax_m.set_ylabel("µs per weight")
    ax_m.set_title("one-row product (batch-1 decode), weights from memory")
    ax_m.legend(fontsize=8)
    m = report["meta"]
    fig.suptitle(f"lmcore.linear on {m['cpu']}, 1 thread, torch {m['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes (smoke run)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/linear_cpu.json)")
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error("--quick needs --out (keeps the committed bench/ results untouched)")
    if not onednn_supported():
        parser.error("oneDNN's linear op does not run here (a non-x86 CPU, or a torch without it)")
    torch.set_num_threads(1)
    started = time.perf_counter()
    with torch.inference_mode():
        report = {"gemm": gemm_rows(args.quick), "matvec": matvec_rows(args.quick)}
    report["meta"] = {
        "timing": "median of 5 rounds, each timing every way of a row in turn (the first way "
                  "rotating), after a warm-up of each",
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **provenance(__file__, argv),
        "torch": torch.__version__, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "threads": 1, "dtype": "float32", "wall_s": round(time.perf_counter() - started, 1),
        "blas": "MKL" if torch.backends.mkl.is_available() else "default",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_vendor": cpu_vendor(),
        # What lmcore.linear uses for GEMMs here (auto: oneDNN where MKL leaves AVX-512 unused).
        "lmcore_gemm": "oneDNN" if onednn_enabled() else "BLAS",
    }  # fmt: skip
    out = args.out or DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    ratios = [r["onednn_vs_blas"] for r in report["gemm"]]
    print(json.dumps({"gemm_onednn_vs_blas_median": statistics.median(ratios),
                      "lmcore_gemm": report["meta"]["lmcore_gemm"],
                      "matvec_fastest": {f"{r['shape'][0]}x{r['shape'][1]}":
                                         (r["fastest"], round(r["fastest_vs_onednn_row_major"], 2))
                                         for r in report["matvec"]},
                      "out": str(out)}, indent=2))  # fmt: skip
    return report


if __name__ == "__main__":
    main()
