"""CPU benchmark of loading a model dir to serve: wall time and peak memory, lmcore against the
plain way, each load in a fresh process.

For each preset (`small`, `gpt2-124m`; random weights saved once with `save_model_dir`) and each
serving form (fp32, bf16, int8), two ways of getting the same laid-out model:
- `lmcore`: `load_model_dir(path, dtype=, quantized=)`: the model is built without its random
  init, in the dtype it serves in, and each tensor is copied in through a mapping of its own;
- `plain`: what a PyTorch user writes: `Transformer(config)` (with its random init),
  `load_state_dict(safetensors.torch.load_file(...))`, then the same cast, quantization and
  `use_inference_layout`.
Peak memory is the process's peak resident set during the load, less what it held before
(Linux's VmHWM, reset just before loading); "resident after" is what the loaded model keeps.
A load in a fresh process is what a worker or `lmctl generate` pays, imports excepted. Both
ways must give the same logits on a probe prompt (to layout rounding), or the run fails.

    python scripts/bench_load.py            # -> bench/load_cpu.json + .png
    python scripts/bench_load.py --quick --out /tmp/load.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/bench_load.py`
    sys.path.insert(0, str(ROOT))

from lmcore.checkpoint import CONFIG_FILE, MODEL_FILE, save_model_dir  # noqa: E402
from lmcore.config import ModelConfig, preset  # noqa: E402
from lmcore.model import Transformer  # noqa: E402
from scripts.bench_lmcore import cpu_model  # noqa: E402
from scripts.bench_meta import provenance  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "load_cpu.json"
WAYS = ("lmcore", "plain")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "int8": None}
PROBE_LOGITS = 16


@dataclass(frozen=True)
class Workload:
    presets: tuple[str, ...] = ("small", "gpt2-124m")
    forms: tuple[str, ...] = ("fp32", "bf16", "int8")
    reps: int = 3


FULL = Workload()
QUICK = Workload(presets=("tiny",), forms=("fp32", "int8"), reps=1)


# -- the child: one load in a fresh process ---------------------------------------------------


def _status_mb(*fields: str) -> tuple[float, ...]:
    """The fields of one read of /proc/self/status, in MiB: VmHWM and VmRSS read apart let the
    resident set grow a page in between and read above the peak."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            values[name] = int(rest.split()[0]) / 1024
    missing = [f for f in fields if f not in values]
    if missing:
        raise RuntimeError(f"/proc/self/status has no {missing}")
    return tuple(values[f] for f in fields)


def _reset_peak() -> None:
    """Start VmHWM again from the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def load_plainly(path: Path, form: str) -> Transformer:
    """The textbook load: init, load_state_dict from load_file, cast or quantize, lay out."""
    from safetensors.torch import load_file

    from lmcore.inference_layout import use_inference_layout
    from lmcore.quantize import quantize_int8

    raw = json.loads((path / CONFIG_FILE).read_text())
    model = Transformer(ModelConfig.from_dict(raw["model"])).to(getattr(torch, raw["dtype"]))
    missing, unexpected = model.load_state_dict(load_file(path / MODEL_FILE), strict=False)
    if unexpected or set(missing) - {"head.weight"}:  # a tied head is stored once
        raise RuntimeError(f"tensors do not fit: missing {missing}, unexpected {unexpected}")
    model.eval()
    if DTYPES[form] is not None:
        model.to(DTYPES[form])
    if form == "int8":
        quantize_int8(model)
    use_inference_layout(model)
    return model


def child(way: str, path: Path, form: str) -> dict[str, Any]:
    from lmcore.checkpoint import load_model_dir
    from lmcore.quantize import Int8Linear, model_size_bytes

    torch.set_num_threads(1)
    (before,) = _status_mb("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    if way == "lmcore":
        model = load_model_dir(path, dtype=DTYPES[form], quantized=form == "int8").model
    else:
        model = load_plainly(path, form)
    load_s = time.perf_counter() - started
    peak, after = _status_mb("VmHWM", "VmRSS")
    # Packed copies beside an int8 weight; one that replaced it is in model_size_bytes.
    packed = sum(m.packed_nbytes for m in model.modules()
                 if isinstance(m, Int8Linear) and m.weight is not None)  # fmt: skip
    with torch.inference_mode():
        probe = torch.arange(1, 9)[None] % model.config.vocab_size
        logits = model(probe)[0][0, -1, :PROBE_LOGITS].float().tolist()
    return {"load_s": load_s, "added_peak_mb": peak - before, "added_resident_mb": after - before,
            "model_mb": (model_size_bytes(model) + packed) / 2**20, "probe_logits": logits}


# -- the parent: interleaved fresh processes, medians, ratios --------------------------------


def run_child(way: str, path: Path, form: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", way, str(path), form],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{way} {form} load of {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(dirs: dict[str, Path], w: Workload) -> list[dict[str, Any]]:
    """Every (preset, form, way) load `reps` times, interleaved; medians per combination."""
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for _ in range(w.reps):
        for name, path in dirs.items():
            for form in w.forms:
                for way in WAYS:
                    runs.setdefault((name, form, way), []).append(run_child(way, path, form))
    rows = []
    for (name, form, way), got in runs.items():
        row: dict[str, Any] = {"preset": name, "form": form, "way": way, "reps": len(got)}
        for key in ("load_s", "added_peak_mb", "added_resident_mb", "model_mb"):
            row[key] = round(statistics.median(g[key] for g in got), 3)
        row["probe_logits"] = got[-1]["probe_logits"]
        rows.append(row)
    return rows


def check_same_logits(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """Both ways load the same model: equal probe logits but for layout rounding."""
    by_key = {(r["preset"], r["form"], r["way"]): r["probe_logits"] for r in rows}
    checks = {}
    for preset_name, form in {(r["preset"], r["form"]) for r in rows}:
        a = torch.tensor(by_key[(preset_name, form, "lmcore")])
        b = torch.tensor(by_key[(preset_name, form, "plain")])
        checks[f"{preset_name}_{form}"] = bool(torch.allclose(a, b, rtol=1e-2, atol=1e-3))
    return checks


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """lmcore over plain for each preset and form: peak memory added, and load time."""
    by_key = {(r["preset"], r["form"], r["way"]): r for r in rows}
    out = {}
    for (preset_name, form, way), row in by_key.items():
        if way != "lmcore":
            continue
        plain = by_key[(preset_name, form, "plain")]
        for key, short in (("added_peak_mb", "peak"), ("load_s", "time")):
            out[f"{short}_{preset_name}_{form}"] = round(row[key] / plain[key], 3)
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    groups = list(dict.fromkeys((r["preset"], r["form"]) for r in rows))
    by_key = {(r["preset"], r["form"], r["way"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "added_peak_mb", "peak memory added by the load (MiB)"),
                           (axes[1], "load_s", "load time (s)")):  # fmt: skip
        for i, way in enumerate(WAYS):
            xs = [g + (i - 0.5) * 0.4 for g in range(len(groups))]
            ax.bar(xs, [by_key[(*g, way)][key] for g in groups], 0.4, label=way)
        if key == "added_peak_mb":
            ax.scatter(range(len(groups)), [by_key[(*g, "lmcore")]["model_mb"] for g in groups],
                       marker="_", s=400, color="black", label="the model's own bytes")
        ax.set_xticks(range(len(groups)), [f"{p}\n{f}" for p, f in groups], fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    m = report["meta"]
    fig.suptitle(f"loading a model dir, fresh process each ({m['cpu']}, 1 thread, "
                 f"{m['date_utc'][:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one rep (smoke run)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/load_cpu.json)")
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error("--quick needs --out (keeps the committed bench/ results untouched)")
    w = QUICK if args.quick else FULL
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        dirs = {}
        for name in w.presets:
            torch.manual_seed(0)
            dirs[name] = save_model_dir(Path(tmp) / name, Transformer(preset(name)))
        file_mb = {name: (p / MODEL_FILE).stat().st_size / 2**20 for name, p in dirs.items()}
        rows = measure(dirs, w)
    checks = check_same_logits(rows)
    report = {
        "workload": asdict(w),
        "file_mb": file_mb,
        "results": rows,
        "ratios": ratios(rows),
        "checks": {"same_logits_both_ways": checks},
        "meta": {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 **provenance(__file__, argv),
                 "torch": torch.__version__, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                 "threads": 1, "wall_s": round(time.perf_counter() - started, 1),
                 "measure": "median of interleaved fresh-process loads; memory from "
                            "/proc/self/status, VmHWM reset just before the load"},  # fmt: skip
    }
    out = args.out or DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps({"ratios": report["ratios"], "checks": report["checks"],
                      "out": str(out)}, indent=2))  # fmt: skip
    if not all(checks.values()):
        raise SystemExit(f"the two ways loaded different models: {checks}")
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2], Path(sys.argv[3]), sys.argv[4])))
    else:
        main()
