"""CPU benchmark of greedy decode in the forms a worker can serve: fp32, bf16 and int8 weights.

One model (bench_lmcore's shape, 6 layers x 384, vocabulary 8,192, lmcore's default SwiGLU,
random weights), one thread, greedy `generate_ids` at batch 1, 4 and 16, every form interleaved
in the same run, each built the way the worker builds it:
- `fp32`: laid out by `use_inference_layout` (what `load_model_dir` returns);
- `bf16`, `int8`: cast or quantized first, then laid out (`load_model_dir(dtype=, quantized=)`):
  bf16 weights measured in bf16, int8 layers measured for how many rows their byte bag reads;
- `bf16_before`, `int8_before`: the order the worker used before, laid out in fp32 and then
  cast or quantized (so bf16 kept the fp32 choices, and int8 layers converted their whole
  weight on every call): the peers that say what the change is worth;
- `int8_fp32_head`: int8 laid out as `int8`, but with the tied head and token table left in
  fp32 (`skip=("head",)`, what `quantize_int8` did before it quantized the tied pair);
- `int8_bf16`: bf16 activations with int8 weights (`load_model_dir(dtype=bf16, quantized=True)`),
  where int8 layers may also take PyTorch's int8 weight-only GEMM, and its peer
  `int8_bf16_nopack`, laid out with that GEMM switched off (LMCORE_INT8PACK=0).
Also per form: the bytes its weights hold resident while it serves (`resident_weight_bytes`:
`model_size_bytes`, reported alone as `weight_bytes`, which counts an int8 layer's packed copy
where it replaced the int8 weight, plus `packed_bytes`, the packed copies int8 layers keep for
the byte bag beside their int8 weight, counted after the timed runs), the layout chosen, and how
many greedy tokens agree with fp32 (random weights make near-ties, so this is a rate, not an
identity).

`dequant_blocks`: the product every int8 layer falls back to beyond the rows its byte bag and
int8pack serve (a prefill, a large batch): the whole weight converted, then one GEMM, against
`Int8Linear.dequant_blocks` converting a block of output rows at a time, at several block sizes
(`default_block_rows`: the one `dequant_product` takes), on the bench model's head and
gpt2-124m's head and MLP weights (fp32 and bf16 activations, interleaved, medians).

    python scripts/bench_quantized.py            # -> bench/quantized_cpu.json + .png
    python scripts/bench_quantized.py --quick --out /tmp/q.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/bench_quantized.py`
    sys.path.insert(0, str(ROOT))

from lmcore.generate import SamplingParams, generate_ids  # noqa: E402
from lmcore.inference_layout import describe, use_inference_layout  # noqa: E402
from lmcore.model import Transformer  # noqa: E402
from lmcore.quantize import (  # noqa: E402
    INT8PACK_SWITCH,
    Int8Linear,
    dequant_block_rows,
    model_size_bytes,
    quantize_int8,
)
from scripts import bench_lmcore  # noqa: E402
from scripts.bench_lmcore import cpu_model, interleaved, medians, timed  # noqa: E402
from scripts.bench_meta import provenance  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "quantized_cpu.json"


@dataclass(frozen=True)
class Workload:
    batches: tuple[int, ...] = (1, 4, 16)
    prompt_len: int = 32
    new_tokens: int = 64
    reps: int = 5
    seed: int = 0


FULL = Workload()
QUICK = Workload(batches=(1, 2), prompt_len=8, new_tokens=8, reps=1)
# dequant_blocks: (out_features, in_features) of the bench model's head, gpt2-124m's head and
# MLP weights; rows of x; rows of the weight converted per block.
DEQUANT_SHAPES = ((8192, 384), (50304, 768), (3072, 768), (768, 3072))
DEQUANT_ROWS = (17, 64, 256)
DEQUANT_BLOCKS = (256, 512, 1024, 2048)


def build_forms(base: Transformer) -> tuple[dict[str, Transformer], dict[str, Any]]:
    """Every form from a copy of the same fp32 weights; and each one's layout, described."""
    def laid_out(model: Transformer) -> Transformer:
        choices = use_inference_layout(model)
        layouts[name] = {"described": describe(choices), "choices": [asdict(c) for c in choices]}
        return model

    recipes: dict[str, Callable[[Transformer], Transformer]] = {
        "fp32": laid_out,
        "bf16": lambda m: laid_out(m.to(torch.bfloat16)),
        "bf16_before": lambda m: laid_out(m).to(torch.bfloat16),
        "int8": lambda m: laid_out(quantize_int8(m)),
        "int8_before": lambda m: quantize_int8(laid_out(m), skip=("head",)),  # bag_rows 0
        "int8_fp32_head": lambda m: laid_out(quantize_int8(m, skip=("head",))),
        "int8_bf16": lambda m: laid_out(quantize_int8(m.to(torch.bfloat16))),
        "int8_bf16_nopack": lambda m: without_int8pack(
            lambda: laid_out(quantize_int8(m.to(torch.bfloat16)))),
    }
    forms: dict[str, Transformer] = {}
    layouts: dict[str, Any] = {}
    for name, recipe in recipes.items():
        forms[name] = recipe(copy.deepcopy(base)).eval()
    return forms, layouts


def packed_bytes(model: Transformer) -> int:
    """Bytes of the byte bag's packed copies kept beside an int8 weight (Int8Linear.packed_nbytes):
    a copy that replaced the weight is the layer's weights, in model_size_bytes already."""
    return sum(m.packed_nbytes for m in model.modules()
               if isinstance(m, Int8Linear) and m.weight is not None)  # fmt: skip


def without_int8pack(build: Callable[[], Transformer]) -> Transformer:
    """build() with lmcore's int8 weight-only GEMM switched off, as LMCORE_INT8PACK=0 does."""
    with mock.patch.dict(os.environ, {INT8PACK_SWITCH: "0"}):
        return build()


def decoder(model: Transformer, prompts: list[list[int]], new_tokens: int) -> Callable:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, eos=False)
    last: dict[str, list[list[int]]] = {}

    def run() -> bench_lmcore.Timing:
        def call() -> None:
            last["ids"] = [g.token_ids for g in generate_ids(model, prompts, params)]
        return timed(call)

    run.last = last  # type: ignore[attr-defined]
    return run


def agreement(ids: list[list[int]], reference: list[list[int]]) -> float:
    pairs = [(a, b) for row, ref in zip(ids, reference) for a, b in zip(row, ref)]
    return sum(a == b for a, b in pairs) / len(pairs)


def measure(forms: dict[str, Transformer], w: Workload, vocab: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(w.seed)
    rows = []
    for batch in w.batches:
        prompts = torch.randint(1, vocab, (batch, w.prompt_len), generator=gen).tolist()
        runners = {name: decoder(m, prompts, w.new_tokens) for name, m in forms.items()}
        for run in runners.values():
            run()  # warm-up: first calls build kernels and pack int8 weights
        times = interleaved(runners, {name: w.reps for name in runners})
        reference = runners["fp32"].last["ids"]  # type: ignore[attr-defined]
        for name, runs in times.items():
            ids = runners[name].last["ids"]  # type: ignore[attr-defined]
            rows.append({"form": name, "batch": batch, "prompt_len": w.prompt_len,
                         "new_tokens": w.new_tokens, **medians(runs, batch * w.new_tokens),
                         "greedy_agreement_with_fp32": agreement(ids, reference)})  # fmt: skip
    return rows


def dequant_blocks(quick: bool, reps: int) -> list[dict[str, Any]]:
    """Milliseconds per product, the whole conversion against blocks of each size."""
    shapes = ((512, 64),) if quick else DEQUANT_SHAPES
    rows_list = (17,) if quick else DEQUANT_ROWS
    blocks = (64,) if quick else DEQUANT_BLOCKS
    results = []
    for out_f, in_f in shapes:
        layer = Int8Linear.from_linear(torch.nn.Linear(in_f, out_f, bias=False))
        for dtype in (torch.float32, torch.bfloat16):
            for rows in rows_list:
                x = torch.randn(rows, in_f).to(dtype)
                # One block of every row: the whole weight converted, as before blocks.
                ways: dict[str, Callable[[], Any]] = {
                    "whole": lambda: layer.dequant_blocks(x, out_f)}
                for block in blocks:
                    ways[f"rows_{block}"] = lambda b=block: layer.dequant_blocks(x, b)
                want = ways["whole"]().float()
                for fn in ways.values():  # warm-up, and every way gives the same product
                    torch.testing.assert_close(fn().float(), want, rtol=0.02, atol=0.02)
                runners = {name: lambda fn=fn: timed(fn) for name, fn in ways.items()}
                times = interleaved(runners, {name: reps for name in runners})
                ms = {name: round(1e3 * medians(runs, 1)["median_s"], 3)
                      for name, runs in times.items()}  # fmt: skip
                results.append({"shape": [out_f, in_f], "dtype": str(dtype).split(".")[-1],
                                "rows": rows, "ms": ms,
                                "whole_vs_block": {n: round(ms["whole"] / v, 3)
                                                   for n, v in ms.items() if n != "whole"},
                                "default_block_rows": dequant_block_rows(in_f),
                                "splits_by_default": out_f > 2 * dequant_block_rows(in_f),
                                "converted_bytes": {"whole": out_f * in_f * x.element_size(),
                                                    **{f"rows_{b}": b * in_f * x.element_size()
                                                       for b in blocks}}})  # fmt: skip
    return results


def ratios(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    speed = {(r["form"], r["batch"]): r[key] for r in rows}
    out = {}
    for batch in sorted({r["batch"] for r in rows}):
        for a, b in [("int8", "int8_before"), ("int8", "int8_fp32_head"), ("int8", "fp32"),
                     ("bf16", "bf16_before"), ("bf16", "fp32"), ("int8_bf16", "int8_bf16_nopack"),
                     ("int8_bf16", "bf16")]:  # fmt: skip
            out[f"{a}_vs_{b}_b{batch}"] = round(speed[(a, batch)] / speed[(b, batch)], 3)
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    forms = list(dict.fromkeys(r["form"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    speed = {(r["form"], r["batch"]): r["tokens_per_s"] for r in rows}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(forms)
    for i, form in enumerate(forms):
        xs = [b + (i - (len(forms) - 1) / 2) * width for b in range(len(batches))]
        ax.bar(xs, [speed[(form, b)] for b in batches], width, label=form)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=8)
    m = report["meta"]
    ax.set_title(f"greedy decode on CPU by weight form ({m['cpu']}, 1 thread, "
                 f"{m['date_utc'][:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-layer model, 8 tokens (smoke run)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/quantized_cpu.json)")
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error("--quick needs --out (keeps the committed bench/ results untouched)")
    w = QUICK if args.quick else FULL
    shape = bench_lmcore.QUICK if args.quick else bench_lmcore.FULL
    torch.set_num_threads(1)
    started = time.perf_counter()
    base = bench_lmcore.build_lmcore(shape, "swiglu").eval()
    forms, layouts = build_forms(base)
    with torch.inference_mode():
        rows = measure(forms, w, shape.vocab_size)
        blocked = dequant_blocks(args.quick, w.reps)
    weight = {name: model_size_bytes(m) for name, m in forms.items()}
    packed = {name: packed_bytes(m) for name, m in forms.items()}  # made by now, if ever
    resident = {name: weight[name] + packed[name] for name in forms}
    report = {
        "workload": asdict(w),
        "model": {"n_layer": shape.n_layer, "n_embd": shape.n_embd, "vocab_size": shape.vocab_size,
                  "mlp": "swiglu", "params": bench_lmcore.count_params(base)},
        "results": rows,
        "ratios": ratios(rows, "tokens_per_s"),
        "ratios_cpu_time": ratios(rows, "tokens_per_cpu_s"),
        "weight_bytes": weight,
        "packed_bytes": packed,
        "resident_weight_bytes": resident,
        "resident_vs_fp32": {name: round(b / resident["fp32"], 3) for name, b in resident.items()},
        "dequant_blocks": blocked,
        "layouts": layouts,
        "meta": {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 **provenance(__file__, argv),
                 "torch": torch.__version__, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                 "threads": 1, "wall_s": round(time.perf_counter() - started, 1),
                 "timing": "median of interleaved reps after one warm-up run each; decode "
                           "time includes the prefill of the prompts"},  # fmt: skip
    }
    out = args.out or DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps({"ratios": report["ratios"],
                      "layouts": {name: lay["described"] for name, lay in layouts.items()},
                      "tokens_per_s": {f"{r['form']} b{r['batch']}": round(r["tokens_per_s"])
                                       for r in rows},
                      "dequant_whole_vs_block": [(r["shape"], r["dtype"], r["rows"],
                                                  r["whole_vs_block"]) for r in blocked],
                      "out": str(out)}, indent=2))  # fmt: skip
    return report


if __name__ == "__main__":
    main()
