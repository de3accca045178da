"""The benchmark scripts still run end to end and check what they claim: the CPU ones in their
--quick modes, the GPU ones (which only a lent device runs for real) in their CPU --dry-run modes.

Real subprocesses writing real JSON to a temporary path; the committed bench/ files are never
touched. Numbers from a smoke run mean nothing, so only the scripts' own checks are asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmcore.linear import onednn_supported

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def run_script(script: str, mode: str, out: Path) -> dict:
    """scripts/<script> in `mode` (--quick, or a GPU script's CPU --dry-run); its JSON report."""
    proc = subprocess.run(
        [sys.executable, f"scripts/{script}", mode, "--out", str(out)], cwd=REPO,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def run_quick(script: str, out: Path) -> dict:
    report = run_script(script, "--quick", out)
    assert out.with_suffix(".png").is_file()
    # The report says how to make it again: the command as run, and the switches it ran under.
    made = report if "command" in report else report["meta"]
    assert made["command"] == f"python scripts/{script} --quick --out {out}", made["command"]
    assert {"LMCORE_ONEDNN_LINEAR", "LMCORE_INT8PACK", "OMP_NUM_THREADS"} <= set(made["env"])
    return report


def test_bench_lmcore_quick_run_checks_cache_and_kv_memory(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the peer model needs transformers (dev extra)")
    report = run_quick("bench_lmcore.py", tmp_path / "lmcore.json")
    assert report["checks"]["cached_greedy_equals_recompute"] is True
    assert report["targets"]["kv_cache_matches_formula"]["met"] is True
    assert {r["impl"] for r in report["decode"]} >= {"lmcore", "transformers", "lmcore-nocache"}
    bf16 = {r["impl"] for r in report["train"] if r["precision"] == "bf16"}
    assert bf16 == {"lmcore-bf16", "transformers-bf16"}
    assert report["ratios"]["train_bf16_lmcore_vs_hf"] > 0


@pytest.mark.skipif(not onednn_supported(), reason="oneDNN's linear op does not run here")
def test_bench_linear_quick_run_times_both_libraries_and_layouts(tmp_path: Path) -> None:
    report = run_quick("bench_linear.py", tmp_path / "linear.json")
    products = {r["product"] for r in report["gemm"]}
    assert products == {"forward x·Wᵀ", "grad input g·W", "grad weight gᵀ·x"}
    for row in report["gemm"]:
        assert row["blas_gflops"] > 0 and row["onednn_gflops"] > 0
    variants = {f"{k}_{o}" for k in ("onednn", "blas") for o in ("row_major", "column_major")}
    variants.add("bag_column_major")
    for row in report["matvec"]:
        times = {v: row[f"{v}_us"] for v in variants}
        assert all(t > 0 for t in times.values())
        assert row["fastest"] == min(times, key=times.__getitem__)
        assert row["fastest_vs_onednn_row_major"] >= 1.0
        assert row["read_gb_per_s"] > 0 and row["fastest_gb_per_s"] > 0


def test_bench_engine_quick_run_gets_the_same_tokens_every_way(tmp_path: Path) -> None:
    report = run_quick("bench_engine.py", tmp_path / "engine.json")
    assert report["checks"]["same_tokens_every_way"] is True
    assert set(report["results"]) == {"engine", "static", "one_at_a_time", "engine_top_p",
                                      "engine_top_k_1000"}  # fmt: skip
    assert report["ratios"]["engine_top_p_vs_engine"] > 0
    assert report["ratios"]["engine_top_k_1000_vs_engine"] > 0


def test_bench_quantized_quick_run_times_every_form_and_shrinks_the_weights(
    tmp_path: Path,
) -> None:
    report = run_quick("bench_quantized.py", tmp_path / "quantized.json")
    forms = {"fp32", "bf16", "bf16_before", "int8", "int8_before", "int8_fp32_head", "int8_bf16",
             "int8_bf16_nopack"}
    assert {(r["form"], r["batch"]) for r in report["results"]} == {
        (f, b) for f in forms for b in report["workload"]["batches"]
    }
    assert all(r["tokens_per_s"] > 0 for r in report["results"])
    size, packed = report["weight_bytes"], report["packed_bytes"]
    assert size["bf16"] == size["fp32"] // 2
    assert size["int8"] < 0.3 * size["fp32"] < size["int8_fp32_head"]  # the tied head in int8
    assert packed["fp32"] == packed["bf16"] == 0
    assert report["resident_weight_bytes"] == {k: size[k] + packed[k] for k in size}
    dtypes = {name: {c["dtype"] for c in lay["choices"]} for name, lay in report["layouts"].items()}
    assert dtypes["bf16"] == {"bfloat16"} and dtypes["bf16_before"] == {"float32"}
    assert dtypes["int8"] == {"int8"} and dtypes["int8_fp32_head"] == {"float32", "int8"}
    pack_rows = {name: {c["pack_rows"] for c in report["layouts"][name]["choices"]}
                 for name in ("int8", "int8_bf16_nopack")}  # fmt: skip
    assert pack_rows == {"int8": {0}, "int8_bf16_nopack": {0}}  # fp32 activations; switched off
    blocked = report["dequant_blocks"]
    assert {(r["dtype"], r["rows"]) for r in blocked} == {("float32", 17), ("bfloat16", 17)}
    for row in blocked:
        assert set(row["ms"]) == {"whole", "rows_64"} and min(row["ms"].values()) > 0
        assert row["converted_bytes"]["rows_64"] < row["converted_bytes"]["whole"]


def test_bench_load_quick_run_loads_every_form_both_ways_to_the_same_model(
    tmp_path: Path,
) -> None:
    report = run_quick("bench_load.py", tmp_path / "load.json")
    w = report["workload"]
    assert {(r["preset"], r["form"], r["way"]) for r in report["results"]} == {
        (p, f, way) for p in w["presets"] for f in w["forms"] for way in ("lmcore", "plain")
    }
    for row in report["results"]:
        assert row["load_s"] > 0 and row["added_peak_mb"] >= row["added_resident_mb"] > 0
    assert all(report["checks"]["same_logits_both_ways"].values())
    assert set(report["ratios"]) == {f"{k}_{p}_{f}" for k in ("peak", "time")
                                     for p in w["presets"] for f in w["forms"]}  # fmt: skip


def test_bench_events_quick_run_delivers_every_chunk_parked_or_not(tmp_path: Path) -> None:
    report = run_quick("bench_events.py", tmp_path / "events.json")
    rows = report["results"]
    assert {(r["backlog"], r["parked"]) for r in rows} == {(b, p) for b in (0, 50)
                                                          for p in (False, True)}  # fmt: skip
    for row in rows:
        assert row["chunks"] > 0 and row["received"] == row["chunks"]
        assert row["xread_calls"] > 0
    assert set(report["ratios"]) == {"0", "50"}


def test_gpu_checks_time_their_ways_in_rounds_after_one_warm_up_each() -> None:
    from scripts.gpu_checks import interleaved

    calls: list[str] = []

    def way(name: str):
        def run() -> float:
            calls.append(name)
            return float(len(calls))

        return run

    seconds = interleaved({"a": way("a"), "b": way("b"), "c": way("c")}, reps=3)
    assert calls == ["a", "b", "c"] * 3
    assert seconds == {"a": [1.0, 4.0, 7.0], "b": [2.0, 5.0, 8.0], "c": [3.0, 6.0, 9.0]}


@pytest.mark.slow
def test_gpu_checks_dry_run_runs_every_check_and_both_engine_ways_agree(tmp_path: Path) -> None:
    # The GPU scripts run for real only on a lent device; a dry run here keeps its minutes off
    # script bugs.
    report = run_script("gpu_checks.py", "--dry-run", tmp_path / "gpu.json")
    checks = report["checks"]
    assert set(checks) == {"flash_sdpa_bf16", "train_step_mfu", "trainer_vs_bare_step",
                           "decode_compiled_b1", "engine_batched_sampled",
                           "engine_hot_swap", "int8_decode_b1"}  # fmt: skip
    for name, result in checks.items():
        assert "error" not in result and "skipped" not in result, (name, result)
    assert checks["decode_compiled_b1"]["engine_run_ahead_over_step_by_step"] > 0
    for when in ("host_speed_start", "host_speed_end"):  # to tell one lent host from another
        speed = report["meta"][when]
        assert speed["python_1m_adds_ms"] > 0 and speed["torch_cpu_op_us"] > 0
    assert checks["int8_decode_b1"]["int8_over_bf16"] > 0  # a compiled int8 engine decodes
    swap = checks["engine_hot_swap"]
    assert swap["ok"] is True and swap["graphs_compiled_by_the_swap"] == 0, swap
    # On a CPU bf16 sampling repeats, so running ahead must not change a single token.
    assert checks["engine_batched_sampled"]["run_ahead_same_tokens"] == {
        "compiled": True, "eager": True}


@pytest.mark.slow
def test_gpu_determinism_dry_run_repeats_and_a_request_alone_matches_its_batch_row(
    tmp_path: Path,
) -> None:
    report = run_script("gpu_determinism.py", "--dry-run", tmp_path / "det.json")
    settings = report["settings"]
    for name in ("bf16", "bf16_sdpa_default_choice", "bf16_sdpa_math",
                 "bf16_deterministic_algorithms", "fp32"):  # fmt: skip
        assert settings[name]["reproducible"] is True, (name, settings[name])
    # No efficient attention on a CPU: the error shows the setting reached the model's attention.
    assert "No viable backend" in settings["bf16_sdpa_efficient"]["error"]
    for way in ("eager", "compiled"):
        assert report["bf16_alone_against_batch"][way]["alone_matches_batch"] is True, way
