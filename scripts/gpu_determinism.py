"""Is seeded sampling reproducible run to run on this GPU, and which kernel choice breaks it?

The same 32 seeded, sampled requests run twice through one step-by-step eager Engine
(`gpt2-124m`, random weights), per setting: bf16 as served (cached attention held to the
efficient or math backend), bf16 with SDPA's own backend choice (the control: it did not repeat
on an H200), bf16 held to one backend, bf16 under torch.use_deterministic_algorithms, and fp32.
A setting is reproducible when both runs give the same token ids. Prints one JSON line per
setting and writes them all to --out.

Then whether a request's text depends on the rest of its batch (lmcore promises it does not):
in bf16 as served, eager and compiled, a few of those requests run alone and are compared with
their rows when all 32 ran together.

    python scripts/gpu_determinism.py --out bench/gpu_determinism.json   # on a GPU, ~2 min
    python scripts/gpu_determinism.py --dry-run --out /tmp/det.json     # tiny model on CPU
"""

from __future__ import annotations

import os

# cuBLAS reads this when it first starts; deterministic algorithms need it for bitwise repeats.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/gpu_determinism.py`
    sys.path.insert(0, str(ROOT))

from lmcore import model as model_module  # noqa: E402
from lmcore.config import preset  # noqa: E402
from lmcore.engine import Engine, EngineRequest  # noqa: E402
from lmcore.generate import SamplingParams  # noqa: E402
from lmcore.model import Transformer  # noqa: E402


@contextlib.contextmanager
def cached_attention_held_to(backends: list[SDPBackend] | None) -> Iterator[None]:
    """Hold the model's cached attention to `backends` on every device; None lets SDPA choose.

    The model sets its own backends inside (lmcore.model), which would override an
    sdpa_kernel() around the run, so the settings change what it sets.
    """
    saved = model_module.REPRODUCIBLE_MASKED_SDPA, model_module.PINNED_MASKED_SDPA_DEVICES
    if backends is None:
        model_module.PINNED_MASKED_SDPA_DEVICES = frozenset()
    else:
        model_module.REPRODUCIBLE_MASKED_SDPA = backends
        model_module.PINNED_MASKED_SDPA_DEVICES = frozenset({"cpu", "cuda"})
    try:
        yield
    finally:
        model_module.REPRODUCIBLE_MASKED_SDPA, model_module.PINNED_MASKED_SDPA_DEVICES = saved


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with cached_attention_held_to(None):
            yield
    finally:
        torch.use_deterministic_algorithms(False)


# name -> (dtype, context the runs happen in)
SETTINGS: dict[str, tuple[torch.dtype, Callable[[], contextlib.AbstractContextManager]]] = {
    "bf16": (torch.bfloat16, contextlib.nullcontext),
    "bf16_sdpa_default_choice": (torch.bfloat16, lambda: cached_attention_held_to(None)),
    "bf16_sdpa_math": (torch.bfloat16, lambda: cached_attention_held_to([SDPBackend.MATH])),
    "bf16_sdpa_efficient": (torch.bfloat16,
                            lambda: cached_attention_held_to([SDPBackend.EFFICIENT_ATTENTION])),
    "bf16_deterministic_algorithms": (torch.bfloat16, deterministic_algorithms),
    "fp32": (torch.float32, contextlib.nullcontext),
}


def first_difference(a: list[list[int]], b: list[list[int]]) -> dict[str, int | None]:
    """How many rows differ, and the earliest token index where any does."""
    rows = [i for i in range(len(a)) if a[i] != b[i]]
    firsts = [next(j for j, (x, y) in enumerate(zip(a[i], b[i])) if x != y) for i in rows]
    return {"rows_differ": len(rows), "first_token_index": min(firsts, default=None)}


@torch.inference_mode()
def twice(model: Transformer, prompts: list[list[int]], new_tokens: int) -> list[list[list[int]]]:
    engine = Engine(model, max_batch=len(prompts), max_len=len(prompts[0]) + new_tokens,
                    run_ahead=False)  # fmt: skip
    runs = []
    for _ in range(2):
        params = [_seeded(new_tokens, i) for i in range(len(prompts))]
        handles = [engine.submit(EngineRequest(p, sp)) for p, sp in zip(prompts, params)]
        while engine.step():
            pass
        runs.append([h.result(timeout=0).token_ids for h in handles])
    return runs


@torch.inference_mode()
def alone_against_batch(model: Transformer, prompts: list[list[int]], new_tokens: int,
                        compile: bool, alone: int) -> dict[str, int | None]:  # fmt: skip
    """Run all prompts together, then the first `alone` one by one, on one served-style engine."""
    engine = Engine(model, max_batch=len(prompts), max_len=len(prompts[0]) + new_tokens,
                    compile=compile)  # fmt: skip

    def run(seeds: list[int]) -> list[list[int]]:  # request i: prompt i with seed i
        handles = [engine.submit(EngineRequest(prompts[i], _seeded(new_tokens, i)))
                   for i in seeds]  # fmt: skip
        while engine.step():
            pass
        return [h.result(timeout=0).token_ids for h in handles]

    together = run(list(range(len(prompts))))[:alone]
    one_by_one = [run([i])[0] for i in range(alone)]
    return {"requests": alone, **first_difference(one_by_one, together)}


def _seeded(new_tokens: int, seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=new_tokens, temperature=0.8, top_k=50, seed=seed,
                          eos=False)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    name, batch, prompt_len, new_tokens = ("tiny", 8, 8, 16) if args.dry_run else \
        ("gpt2-124m", 32, 32, 256)
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, preset(name).vocab_size, (batch, prompt_len),
                            generator=generator).tolist()  # fmt: skip
    results = {}
    for setting, (dtype, context) in SETTINGS.items():
        torch.manual_seed(0)
        model = Transformer(preset(name)).to(device, dtype).eval()
        try:
            with context():
                first, second = twice(model, prompts, new_tokens)
        except Exception as exc:  # noqa: BLE001 - e.g. a backend this device lacks
            results[setting] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        else:
            diff = first_difference(first, second)
            results[setting] = {"reproducible": diff["rows_differ"] == 0, **diff}
        print(json.dumps({"setting": setting, **results[setting]}), flush=True)
    invariance = {}
    for way, compiled in (("eager", False), ("compiled", True)):
        torch.manual_seed(0)
        model = Transformer(preset(name)).to(device, torch.bfloat16).eval()
        try:
            diff = alone_against_batch(model, prompts, new_tokens, compiled, alone=4)
        except Exception as exc:  # noqa: BLE001 - e.g. no compiler on this machine
            invariance[way] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        else:
            invariance[way] = {"alone_matches_batch": diff["rows_differ"] == 0, **diff}
        print(json.dumps({"alone_against_batch": way, **invariance[way]}), flush=True)
    doc = {"model": name, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
           "sampling": "temperature 0.8, top_k 50, a seed per request", "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "settings": results, "bf16_alone_against_batch": invariance}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
