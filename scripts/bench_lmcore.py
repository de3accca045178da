"""CPU benchmark of lmcore against Hugging Face GPT-2 of the same size: decode, training, KV memory.

Every figure is measured interleaved (ABAB...) with its peer in the same run, random weights, fp32;
it must not be read as an absolute speed of the machine (a shared CPU is noisy), only as ratios.
The training step also runs under bf16 autocast for both models (`-bf16` rows): what an explicit
`mixed_precision=bf16` buys on this CPU (lmcore's `auto` stays fp32 on every CPU).

    python scripts/bench_lmcore.py                 # full run -> bench/lmcore_cpu.json + .png
    python scripts/bench_lmcore.py --quick --out /tmp/b.json   # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/bench_lmcore.py`
    sys.path.insert(0, str(ROOT))

from lmcore.cache import KVCache  # noqa: E402
from lmcore.config import ModelConfig  # noqa: E402
from lmcore.generate import SamplingParams, generate_ids  # noqa: E402
from lmcore.inference_layout import use_inference_layout  # noqa: E402
from lmcore.linear import gemm_library  # noqa: E402
from lmcore.model import Transformer  # noqa: E402
from scripts.bench_meta import provenance  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "lmcore_cpu.json"
TARGETS = {"lmcore_vs_hf_b1": 1.5, "cache_vs_nocache_b1": 3.0, "train_lmcore_vs_hf": 1.2}


@dataclass(frozen=True)
class BenchSettings:
    """Model shape and workload; the full run and the smoke run differ only here."""

    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    vocab_size: int = 8192
    block_size: int = 512
    prompt_len: int = 32
    new_tokens: int = 256
    # No-cache at batch 8 recomputes 8 prefixes per token (~3 min at 256 tokens on one core),
    # so its comparison with the cache runs both at this shorter length.
    short_new_tokens: int = 64
    decode_reps: int = 3
    nocache_reps: int = 2
    train_batch: int = 4
    train_seq: int = 256
    train_steps: int = 5
    threads: int = 1
    seed: int = 0


FULL = BenchSettings()
QUICK = BenchSettings(
    n_layer=2, n_head=2, n_embd=64, vocab_size=512, block_size=64, prompt_len=8,
    new_tokens=16, short_new_tokens=8, decode_reps=1, nocache_reps=1,
    train_batch=2, train_seq=32, train_steps=1,
)


# ---------------------------------------------------------------- models


def lmcore_config(s: BenchSettings, mlp: str) -> ModelConfig:
    # bias=True matches GPT-2's linear layers; the only parameter difference left is that
    # RMSNorm has no bias where GPT-2's LayerNorm has one.
    return ModelConfig(
        vocab_size=s.vocab_size, n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd,
        block_size=s.block_size, mlp=mlp, bias=(mlp == "gelu"), dropout=0.0,
    )


def build_lmcore(s: BenchSettings, mlp: str = "gelu") -> Transformer:
    torch.manual_seed(s.seed)
    return Transformer(lmcore_config(s, mlp))


def build_hf(s: BenchSettings) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config notices about unused GPT-2 defaults

    # GPT-2's default activation, "gelu_new", is the tanh GELU written out in five ops;
    # "gelu_pytorch_tanh" is the same function as one fused op, F.gelu(approximate="tanh"), as
    # lmcore's GELU MLP computes it. Both decode and training use it: the peer gets the faster
    # spelling of the same function.
    config = GPT2Config(
        vocab_size=s.vocab_size, n_positions=s.block_size, n_embd=s.n_embd,
        n_layer=s.n_layer, n_head=s.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa",
        activation_function="gelu_pytorch_tanh",
    )
    torch.manual_seed(s.seed)
    model = GPT2LMHeadModel(config)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def fresh_models(s: BenchSettings) -> dict[str, torch.nn.Module]:
    return {"lmcore": build_lmcore(s, "gelu"), "transformers": build_hf(s),
            "lmcore-swiglu": build_lmcore(s, "swiglu")}


def count_params(model: torch.nn.Module) -> int:
    # parameters() yields a tied weight once, so both models count the shared embedding once.
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- timing


Timing = tuple[float, float]  # (wall seconds, process CPU seconds) of one call


def interleaved(
    runners: dict[str, Callable[[], Timing]], reps: dict[str, int]
) -> dict[str, list[Timing]]:
    """Run the (already warmed up) runners round-robin, ABAB...; timings per call."""
    times: dict[str, list[Timing]] = {name: [] for name in runners}
    for rnd in range(max(reps.values())):
        for name, run in runners.items():
            if rnd < reps[name]:
                times[name].append(run())
    return times


def timed(fn: Callable[[], Any]) -> Timing:
    # CPU time is kept beside wall time: on a shared box it excludes waiting for a core, so it
    # is the steadier of the two (one torch thread, so it is this run's work alone).
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def medians(runs: list[Timing], work: int) -> dict[str, Any]:
    """Throughput from the median wall and median CPU time of runs that each did `work` tokens."""
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    return {"tokens_per_s": work / wall, "tokens_per_cpu_s": work / cpu, "median_s": wall,
            "median_cpu_s": cpu, "runs_wall_s": [round(r[0], 4) for r in runs],
            "runs_cpu_s": [round(r[1], 4) for r in runs]}


# ---------------------------------------------------------------- decode


def lmcore_decoder(
    model: Transformer, prompts: torch.Tensor, new_tokens: int, use_cache: bool
) -> Callable[[int | None], Timing]:
    """A runner: greedy generate_ids for exactly new_tokens tokens (eos off)."""
    ids = prompts.tolist()

    def run(n: int | None = None) -> Timing:
        params = SamplingParams(max_new_tokens=n or new_tokens, temperature=0.0, eos=False)
        return timed(lambda: generate_ids(model, ids, params, eos_id=None, use_cache=use_cache))

    return run


def hf_decoder(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> Callable:
    """A runner: transformers greedy generate with its default (dynamic) cache."""
    mask = torch.ones_like(prompts)

    def run(n: int | None = None) -> Timing:
        n = n or new_tokens

        def call() -> None:
            with torch.inference_mode():
                out = model.generate(
                    prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0, eos_token_id=None,
                )
            assert out.shape[1] == prompts.shape[1] + n, out.shape

        return timed(call)

    return run


def decode_group(
    runners: dict[str, Callable], reps: dict[str, int], batch: int, new_tokens: int
) -> list[dict[str, Any]]:
    """Interleaved decode runs of one (batch, new_tokens) point; one row per implementation."""
    # Warm up with a few tokens only: eager CPU has nothing to compile, it only touches memory.
    for run in runners.values():
        run(4)
    times = interleaved({n: (lambda r=r: r()) for n, r in runners.items()}, reps)
    return [{"impl": name, "batch": batch, "new_tokens": new_tokens,
             **medians(runs, batch * new_tokens)} for name, runs in times.items()]


def run_decode(s: BenchSettings, models: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(s.seed)
    p1 = torch.randint(0, s.vocab_size, (1, s.prompt_len), generator=gen)
    p8 = torch.randint(0, s.vocab_size, (8, s.prompt_len), generator=gen)
    lm, hf, swi = models["lmcore"], models["transformers"], models["lmcore-swiglu"]
    n, short = s.new_tokens, s.short_new_tokens
    rows = decode_group(
        {
            "lmcore": lmcore_decoder(lm, p1, n, True),
            "transformers": hf_decoder(hf, p1, n),
            "lmcore-swiglu": lmcore_decoder(swi, p1, n, True),
            "lmcore-nocache": lmcore_decoder(lm, p1, n, False),
        },
        {"lmcore": s.decode_reps, "transformers": s.decode_reps,
         "lmcore-swiglu": s.decode_reps, "lmcore-nocache": s.nocache_reps},
        batch=1, new_tokens=n,
    )
    rows += decode_group(
        {"lmcore": lmcore_decoder(lm, p8, n, True), "transformers": hf_decoder(hf, p8, n)},
        {"lmcore": s.decode_reps, "transformers": s.decode_reps},
        batch=8, new_tokens=n,
    )
    rows += decode_group(
        {"lmcore": lmcore_decoder(lm, p8, short, True),
         "lmcore-nocache": lmcore_decoder(lm, p8, short, False)},
        {"lmcore": s.nocache_reps, "lmcore-nocache": s.nocache_reps},
        batch=8, new_tokens=short,
    )
    return rows


def cache_matches_recompute(model: Transformer, s: BenchSettings) -> bool:
    """Greedy tokens with and without the cache agree (sanity: the fast path is the same model)."""
    gen = torch.Generator().manual_seed(s.seed + 1)
    prompt = torch.randint(0, s.vocab_size, (2, s.prompt_len), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=8, temperature=0.0, eos=False)
    a = generate_ids(model, prompt, params, eos_id=None, use_cache=True)
    b = generate_ids(model, prompt, params, eos_id=None, use_cache=False)
    return [g.token_ids for g in a] == [g.token_ids for g in b]


# ---------------------------------------------------------------- training


def train_stepper(
    model: torch.nn.Module, s: BenchSettings, hf: bool, bf16: bool = False
) -> Callable[[], Timing]:
    """A runner: one AdamW step (forward + backward + update) on a fixed random batch; with
    bf16, the forward under CPU bf16 autocast (fp32 weights and optimizer, as the trainer)."""
    model.train()
    # The same optimizer for both: fused AdamW, as lmcore's trainer runs it on CPU and CUDA.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    gen = torch.Generator().manual_seed(s.seed)
    x = torch.randint(0, s.vocab_size, (s.train_batch, s.train_seq), generator=gen)

    def step() -> None:
        # HF shifts labels inside the loss; lmcore takes targets as given. Same matmul work.
        # use_cache=False: left on, GPT-2 builds a KV cache (DynamicCache) in training too.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (model(input_ids=x, labels=x, use_cache=False).loss if hf
                    else model(x, x)[1])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return lambda: timed(step)


BF16_TRAINED = ("lmcore", "transformers")  # the parity pair, also stepped under bf16 autocast


def run_train(s: BenchSettings, models: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
    runners = {name: train_stepper(m, s, hf=(name == "transformers")) for name, m in models.items()}
    runners.update({f"{name}-bf16": train_stepper(models[name], s, hf=(name == "transformers"),
                                                  bf16=True)
                    for name in BF16_TRAINED})  # fmt: skip
    for step in runners.values():  # first step allocates grads and optimizer state
        step()
    times = interleaved(runners, {name: s.train_steps for name in runners})
    tokens = s.train_batch * s.train_seq
    rows = []
    for name, runs in times.items():
        model = models[name.removesuffix("-bf16")]
        row = {"impl": name, "batch": s.train_batch, "seq_len": s.train_seq,
               "precision": "bf16" if name.endswith("-bf16") else "fp32",
               **medians(runs, tokens)}
        if isinstance(model, Transformer):
            flops_per_token = model.flops_per_token(s.train_seq)
            row["achieved_gflops_per_cpu_s"] = flops_per_token * row["tokens_per_cpu_s"] / 1e9
        rows.append(row)
    for m in models.values():
        m.eval()
    return rows


# ---------------------------------------------------------------- KV cache memory


def run_kv_cache(model: Transformer, s: BenchSettings) -> list[dict[str, Any]]:
    """KVCache.nbytes against 2 · layers · batch · max_len · n_embd · dtype size.

    No resident-memory figure: the growth of RSS when a cache is allocated said more about the
    allocator (pages it already held and reused) than about the cache, e.g. 21 MB for a 42 MB
    cache."""
    cfg = model.config
    points = [(1, s.prompt_len + s.new_tokens), (8, s.prompt_len + s.new_tokens),
              (8, cfg.block_size), (32, cfg.block_size)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for batch, max_len in points:
            cache = KVCache.for_model(model, batch, max_len, dtype=dtype)
            size = torch.empty((), dtype=dtype).element_size()
            formula = 2 * cfg.n_layer * batch * max_len * cfg.n_embd * size
            rows.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch,
                         "max_len": max_len, "nbytes": cache.nbytes, "formula_bytes": formula,
                         "matches": cache.nbytes == formula})
            del cache
    return rows


# ---------------------------------------------------------------- report


def ratio(rows: list[dict[str, Any]], a: str, b: str, key: str, **where: Any) -> float:
    def pick(impl: str) -> float:
        hits = [r for r in rows if r["impl"] == impl and all(r[k] == v for k, v in where.items())]
        assert len(hits) == 1, (impl, where, hits)
        return hits[0][key]

    return pick(a) / pick(b)


def summarize(
    s: BenchSettings, decode: list[dict], train: list[dict], key: str = "tokens_per_s"
) -> dict[str, float]:
    n, short = s.new_tokens, s.short_new_tokens
    return {
        "lmcore_vs_hf_b1": ratio(decode, "lmcore", "transformers", key, batch=1, new_tokens=n),
        "lmcore_vs_hf_b8": ratio(decode, "lmcore", "transformers", key, batch=8, new_tokens=n),
        "cache_vs_nocache_b1": ratio(
            decode, "lmcore", "lmcore-nocache", key, batch=1, new_tokens=n
        ),
        f"cache_vs_nocache_b8_{short}tok": ratio(
            decode, "lmcore", "lmcore-nocache", key, batch=8, new_tokens=short
        ),
        "swiglu_vs_gelu_b1": ratio(
            decode, "lmcore-swiglu", "lmcore", key, batch=1, new_tokens=n
        ),
        "train_lmcore_vs_hf": ratio(train, "lmcore", "transformers", key),
        "train_swiglu_vs_hf": ratio(train, "lmcore-swiglu", "transformers", key),
        "train_bf16_vs_fp32_lmcore": ratio(train, "lmcore-bf16", "lmcore", key),
        "train_bf16_vs_fp32_hf": ratio(train, "transformers-bf16", "transformers", key),
        "train_bf16_lmcore_vs_hf": ratio(train, "lmcore-bf16", "transformers-bf16", key),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meta(s: BenchSettings, quick: bool, params: dict[str, int]) -> dict[str, Any]:
    import transformers

    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "dtype": "float32", "device": "cpu",
        "quick": quick, "settings": asdict(s), "params": params,
        "hf_attn_implementation": "sdpa", "hf_cache": "DynamicCache (generate's default)",
        "hf_activation": "gelu_pytorch_tanh (fused tanh GELU, the function of lmcore's GELU MLP)",
        "hf_train_use_cache": False,
        "lmcore_cpu_linear": gemm_library(),
        "lmcore_decode_layout": "use_inference_layout, as load_model_dir: per weight shape, "
                                "the order and one-row kernel measured fastest (see "
                                "decode_layout)",
        "timing": "median of interleaved runs (wall and process CPU time); decode time "
                  "includes prefill; weights random; ratios from wall time, ratios_cpu_time "
                  "from CPU time (steadier on a shared machine)",
        "load_average_start": list(os.getloadavg()),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_dec, ax_train, ax_kv) = plt.subplots(1, 3, figsize=(16, 4.8))
    dec = result["decode"]
    labels = [f"{r['impl']}\nb{r['batch']}·{r['new_tokens']}tok" for r in dec]
    colors = [_color(r["impl"]) for r in dec]
    ax_dec.bar(range(len(dec)), [r["tokens_per_s"] for r in dec], color=colors)
    ax_dec.set_xticks(range(len(dec)), labels, fontsize=7, rotation=35, ha="right")
    ax_dec.set_yscale("log")
    ax_dec.set_ylabel("tokens/s (log)")
    ax_dec.set_title("greedy decode, fp32 CPU")
    tr = result["train"]
    colors = [_color(r["impl"]) for r in tr]
    ax_train.bar([r["impl"] for r in tr], [r["tokens_per_s"] for r in tr], color=colors)
    ax_train.set_ylabel("tokens/s")
    ax_train.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax_train.set_title(f"AdamW train step, batch {tr[0]['batch']}×{tr[0]['seq_len']}")
    kv = [r for r in result["kv_cache"] if r["dtype"] == "float32"]
    xs = range(len(kv))
    mib = 2**20
    ax_kv.bar([x - 0.2 for x in xs], [r["nbytes"] / mib for r in kv], 0.4, label="KVCache.nbytes")
    ax_kv.bar([x + 0.2 for x in xs], [r["formula_bytes"] / mib for r in kv], 0.4,
              label="2·L·B·T·C·4")
    ax_kv.set_xticks(list(xs), [f"b{r['batch']}·{r['max_len']}" for r in kv], fontsize=8)
    ax_kv.set_ylabel("MiB")
    ax_kv.set_title("KV cache memory (fp32)")
    ax_kv.legend(fontsize=8)
    m = result["meta"]
    fig.suptitle(f"lmcore vs transformers GPT-2, same shape ({m['cpu']}, "
                 f"{m['torch_threads']} thread(s), torch {m['torch']}, {m['date_utc'][:10]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _color(impl: str) -> str:
    return {"lmcore": "tab:blue", "transformers": "tab:orange", "lmcore-swiglu": "tab:cyan",
            "lmcore-nocache": "tab:gray", "lmcore-bf16": "tab:purple",
            "transformers-bf16": "tab:red"}[impl]


def run(s: BenchSettings, quick: bool, argv: list[str] | None = None) -> dict[str, Any]:
    torch.set_num_threads(s.threads)
    params = {name: count_params(m) for name, m in fresh_models(s).items()}
    info = meta(s, quick, params)
    # Decode runs on eval models laid out for inference, as load_model_dir returns them.
    served = fresh_models(s)
    for name, m in served.items():
        m.eval()
        if isinstance(m, Transformer):
            layout = use_inference_layout(m)
            info.setdefault("decode_layout", {})[name] = [asdict(c) for c in layout]
    kv = run_kv_cache(served["lmcore"], s)
    decode = run_decode(s, served)
    checks = {"cached_greedy_equals_recompute": cache_matches_recompute(served["lmcore"], s)}
    del served
    train = run_train(s, fresh_models(s))
    ratios = summarize(s, decode, train)
    ratios_cpu = summarize(s, decode, train, key="tokens_per_cpu_s")
    info["load_average_end"] = list(os.getloadavg())
    targets: dict[str, Any] = {
        k: {"target": v, "measured": ratios[k], "met": ratios[k] >= v,
            "measured_cpu_time": ratios_cpu[k], "met_cpu_time": ratios_cpu[k] >= v}
        for k, v in TARGETS.items()
    }
    targets["kv_cache_matches_formula"] = {"met": all(r["matches"] for r in kv)}
    return {
        "meta": info,
        "decode": decode,
        "ratios": ratios,
        "ratios_cpu_time": ratios_cpu,
        "targets": targets,
        "checks": checks,
        "train": train,
        "kv_cache": kv,
        **provenance(__file__, argv),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens (smoke run)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/lmcore_cpu.json)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG next to the JSON")
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        parser.error("--quick needs --out (keeps the committed bench/ results untouched)")
    out = args.out or DEFAULT_OUT
    started = time.perf_counter()
    result = run(QUICK if args.quick else FULL, args.quick, argv)
    result["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_plot:
        plot(result, out.with_suffix(".png"))
    print(json.dumps({"ratios": result["ratios"], "targets": result["targets"],
                      "wall_s": result["meta"]["wall_s"], "out": str(out)}, indent=2))
    return result


if __name__ == "__main__":
    main()
