"""GPU checks for lmcore on one CUDA device: flash SDPA, training MFU, Trainer, decode, hot swap,
int8 decode.

Prints one JSON line per check and writes them all to --out. Imports only torch and lmcore (the GPU
image has no transformers or matplotlib); `--dry-run` exercises every path on CPU with a tiny model.

    python scripts/gpu_checks.py --out bench/lmcore_gpu.json     # on an H100, ~3-5 min
    python scripts/gpu_checks.py --dry-run --out /tmp/gpu.json   # on CPU, before spending GPU time
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
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/gpu_checks.py`
    sys.path.insert(0, str(ROOT))

from lmcore.cache import KVCache  # noqa: E402
from lmcore.config import preset  # noqa: E402
from lmcore.generate import SamplingParams, decode_step, generate_ids, prefill  # noqa: E402
from lmcore.model import Transformer  # noqa: E402
from lmcore.train import H100_BF16_PEAK_FLOPS  # noqa: E402
from scripts.bench_lmcore import cpu_model  # noqa: E402 - torch and lmcore only, as here

COMMAND = "python scripts/gpu_checks.py"
DEFAULT_OUT = ROOT / "bench" / "lmcore_gpu.json"


@dataclass(frozen=True)
class CheckSettings:
    """Sizes for the real GPU run; --dry-run swaps in the tiny model and short runs."""

    preset: str = "gpt2-124m"
    flash_batch: int = 4
    flash_seq: int = 1024
    train_batch: int = 16
    train_seq: int = 1024
    train_warmup: int = 3  # the first step compiles forward and backward
    train_steps: int = 30
    trainer_max_gap: float = 0.05  # the full Trainer within 5% of the bare step's tokens/s
    prompt_len: int = 32
    decode_tokens: int = 256
    decode_reps: int = 3  # the first rep compiles and records the CUDA graph
    peak_flops: float = H100_BF16_PEAK_FLOPS
    mfu_target: float = 0.40
    decode_target_tps: float = 1000.0
    engine_batch: int = 32  # sampled requests decoding together in the batched-engine check
    budget_s: float = 420.0  # skip what is left past this, so partial results still come back


GPU = CheckSettings()
DRY = CheckSettings(
    preset="tiny", flash_batch=2, flash_seq=64, train_batch=2, train_seq=64, train_warmup=1,
    train_steps=2, prompt_len=8, decode_tokens=16, decode_reps=2, engine_batch=4,
)


@dataclass
class Env:
    settings: CheckSettings
    device: torch.device
    dry_run: bool
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # earlier checks, by name

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def build(env: Env, dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset(env.settings.preset)).to(env.device, dtype)


def random_ids(env: Env, batch: int, seq: int) -> torch.Tensor:
    vocab = preset(env.settings.preset).vocab_size
    return torch.randint(0, vocab, (batch, seq), device=env.device)


# ---------------------------------------------------------------- (a) flash SDPA in bf16


def sdpa_names(env: Env, fn: Callable[[], Any]) -> list[str]:
    """Names of the ops and device kernels fn runs whose name mentions attention."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if env.cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        env.sync()
    names = {e.name[:160] for e in prof.events()}  # kernel names carry long template lists
    return sorted(n for n in names if "flash" in n.lower() or "attention" in n.lower())


def check_flash_sdpa(env: Env) -> dict[str, Any]:
    """The model's attention runs with only the flash backend allowed, forward and backward."""
    s = env.settings
    model = build(env)
    x = random_ids(env, s.flash_batch, s.flash_seq)

    def forward_backward() -> torch.Tensor:
        with env.autocast():
            logits, loss = model(x, x)
        loss.backward()
        return logits.detach()

    # Forcing one backend makes SDPA raise if that kernel cannot run (dtype, mask, head size).
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash_logits = forward_backward()
        try:  # the profiler only adds evidence; the forced backend not raising is the check
            names, profiler_error = sdpa_names(env, forward_backward), None
        except Exception as exc:  # noqa: BLE001
            names, profiler_error = None, f"{type(exc).__name__}: {exc}"
    with sdpa_kernel(SDPBackend.MATH):
        math_logits = forward_backward()
    flash32, math32 = flash_logits.float(), math_logits.float()
    diff = (flash32 - math32).abs().max().item()
    rel_l2 = ((flash32 - math32).norm() / math32.norm()).item()
    # Both sides round to bf16 (eps 7.8e-3): on CPU at T=256 the two backends differ by ~0.7%
    # in relative L2 and 0.02 at most elementwise, about what each differs from fp32.
    try:
        torch.testing.assert_close(flash32, math32, atol=1e-1, rtol=1e-1)
        close = rel_l2 < 2e-2
    except AssertionError:
        close = False
    flash_seen = None if names is None else any("flash" in n.lower() for n in names)
    return {
        "ok": close and flash_seen is not False, "ran_with_only_flash_allowed": True,
        "flash_kernel_seen_in_profile": flash_seen, "profiler_error": profiler_error,
        "matches_math_backend": close,
        "max_abs_logit_diff_vs_math": diff, "rel_l2_logit_diff_vs_math": rel_l2,
        "dtype": "bfloat16 (autocast)",
        "shape": [s.flash_batch, s.flash_seq], "profiled_attention_names": names,
    }


# ---------------------------------------------------------------- (b) compiled training MFU


def check_train_mfu(env: Env) -> dict[str, Any]:
    """bf16 autocast + fused AdamW + torch.compile training step: tokens/s and MFU."""
    s = env.settings
    batch = s.train_batch
    while True:
        try:
            return _train_mfu(env, batch)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2  # report the batch that fitted rather than nothing
            torch.cuda.empty_cache()


def _train_mfu(env: Env, batch: int) -> dict[str, Any]:
    s = env.settings
    model = build(env)
    compiled = torch.compile(model)
    opt = torch.optim.AdamW(
        model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )
    x = random_ids(env, batch, s.train_seq)
    y = random_ids(env, batch, s.train_seq)

    def step() -> torch.Tensor:
        with env.autocast():
            _, loss = compiled(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    start = time.perf_counter()
    for _ in range(s.train_warmup):
        step()
    env.sync()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(s.train_steps):
        loss = step()
    env.sync()
    step_s = (time.perf_counter() - start) / s.train_steps
    tokens_per_s = batch * s.train_seq / step_s
    flops_per_token = model.flops_per_token(s.train_seq)
    mfu = flops_per_token * tokens_per_s / s.peak_flops
    return {
        "ok": mfu >= s.mfu_target, "tokens_per_s": tokens_per_s, "mfu": mfu,
        "mfu_target": s.mfu_target, "peak_flops": s.peak_flops,
        "flops_per_token": flops_per_token, "step_s": step_s, "batch": batch,
        "seq_len": s.train_seq, "warmup_s_incl_compile": warmup_s, "loss": float(loss),
        "params": model.num_params(non_embedding=False),
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if env.cuda else None,
        "setup": "bf16 autocast, fused AdamW, torch.compile(model), TF32 on",
    }


# ---------------------------------------------------------------- (c) the full Trainer


def check_trainer_vs_bare_step(env: Env) -> dict[str, Any]:
    """lmcore.train.Trainer (compile on, bf16 auto, memmap-style data) against the bare step.

    Same model, batch and sequence as train_step_mfu, measured in this run: the trainer's own
    work (sampling windows, host-to-device copies, lr schedule, grad clipping) must cost < 5%.
    """
    import numpy as np

    from lmcore.train import TrainConfig, Trainer

    s = env.settings
    bare = env.results.get("train_step_mfu", {})
    if "tokens_per_s" not in bare:
        return {"ok": False, "error": "train_step_mfu did not measure the bare step"}
    model_cfg = preset(s.preset, block_size=s.train_seq)
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, 4_000_000, np.uint16)
    dataset = SimpleNamespace(train=tokens, val=tokens[: 1 << 16], tokenizer=None, meta={})
    cfg = TrainConfig(
        batch_size=bare["batch"], max_steps=1 + s.train_steps, warmup_steps=1, eval_interval=0,
        eval_batches=1, log_interval=10_000, checkpoint_dir=None, device=env.device.type,
        mixed_precision="auto", compile=True, progress=False, peak_flops=s.peak_flops,
    )
    trainer = Trainer(model_cfg, cfg, dataset)
    result = trainer.fit()  # its tokens/s leaves out the first (compiling) step
    ratio = result.tokens_per_s / bare["tokens_per_s"]
    mfu = trainer.model.flops_per_token(s.train_seq) * result.tokens_per_s / s.peak_flops
    return {
        "ok": ratio >= 1 - s.trainer_max_gap, "trainer_tokens_per_s": result.tokens_per_s,
        "bare_step_tokens_per_s": bare["tokens_per_s"], "trainer_over_bare": ratio,
        "max_gap": s.trainer_max_gap, "trainer_mfu": mfu, "mfu_target": s.mfu_target,
        "trainer_mfu_ok": mfu >= s.mfu_target, "timed_steps": s.train_steps,
        "data_time_share": result.data_time_share, "precision": trainer.precision.name,
        "batch": bare["batch"], "seq_len": s.train_seq,
    }


# ---------------------------------------------------------------- (d) compiled decode, batch 1


def check_decode_compiled(env: Env) -> dict[str, Any]:
    """Batch-1 greedy decode with torch.compile(decode_step, reduce-overhead), bf16 weights."""
    from torch._dynamo.utils import counters

    s = env.settings
    skips_before = counters["inductor"].get("cudagraph_skips", 0)
    graphs_before = counters["stats"].get("unique_graphs", 0)
    model = build(env, torch.bfloat16).eval()
    step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    prompt = random_ids(env, 1, s.prompt_len)
    params = SamplingParams(max_new_tokens=s.decode_tokens, temperature=0.0, eos=False)
    ids = prompt.tolist()
    graphs_after_loop: int | None = None

    def loop() -> float:
        nonlocal graphs_after_loop
        elapsed = _device_loop(env, model, step, prompt)
        if graphs_after_loop is None:  # the first run, before any other way, compiled the step
            graphs_after_loop = counters["stats"].get("unique_graphs", 0) - graphs_before
        return elapsed

    def generate() -> float:
        start = time.perf_counter()
        generate_ids(model, ids, params, eos_id=None, step_fn=step)
        env.sync()
        return time.perf_counter() - start

    timed = interleaved({"loop": loop, "generate": generate,
                         "engine": lambda: _engine_run(env, model, prompt, run_ahead=True),
                         "stepwise": lambda: _engine_run(env, model, prompt, run_ahead=False)},
                        s.decode_reps)  # fmt: skip
    loop_s, gen_s, engine_s, stepwise_s = (timed[k] for k in ("loop", "generate", "engine",
                                                             "stepwise"))  # fmt: skip
    engine_tps = s.decode_tokens / statistics.median(engine_s[1:])
    stepwise_tps = s.decode_tokens / statistics.median(stepwise_s[1:])
    loop_tps = s.decode_tokens / statistics.median(loop_s[1:])
    gen_tps = s.decode_tokens / statistics.median(gen_s[1:])
    return {
        "ok": gen_tps >= s.decode_target_tps, "target_tokens_per_s": s.decode_target_tps,
        "generate_ids_tokens_per_s": gen_tps, "step_loop_tokens_per_s": loop_tps,
        "engine_tokens_per_s": engine_tps, "engine_runs_s": engine_s,
        "engine_step_by_step_tokens_per_s": stepwise_tps, "engine_step_by_step_runs_s": stepwise_s,
        "engine_run_ahead_over_step_by_step": engine_tps / stepwise_tps,
        "new_tokens": s.decode_tokens, "prompt_len": s.prompt_len, "batch": 1,
        "first_rep_s_incl_compile": loop_s[0], "loop_runs_s": loop_s, "generate_runs_s": gen_s,
        # Skips mean no CUDA graph (always so on CPU); more graphs after the generate_ids reps
        # would mean a recompile per fresh cache.
        "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0) - skips_before,
        "graphs_compiled": {
            "step_loop": graphs_after_loop,
            "after_generate_ids": counters["stats"].get("unique_graphs", 0) - graphs_before,
        },
        "notes": "generate_ids: lmctl generate's path (eager prefill, greedy run one step "
                 "ahead, fresh cache per call) timed end to end; engine: the serving workers' "
                 "path (Engine(compile=True, max_batch=1), the next step queued before the host "
                 "reads each token; step_by_step: the same engine with run_ahead=False); "
                 "step_loop: one cache, argmax on device, decode only",
    }


def check_engine_batched(env: Env) -> dict[str, Any]:
    """engine_batch sampled requests through the Engine four ways, against a bare step loop.

    Compiled (CUDA graphs) and eager, each running ahead and step by step. The peer is the
    compiled step over the same rows with argmax on the device and no Python per row: the gap
    is what admission, sampling and bookkeeping cost a serving worker.
    """
    from lmcore.engine import Engine, EngineRequest

    s = env.settings
    model = build(env, torch.bfloat16).eval()
    max_len = s.prompt_len + s.decode_tokens
    prompts = random_ids(env, s.engine_batch, s.prompt_len)
    params = [SamplingParams(max_new_tokens=s.decode_tokens, temperature=0.8, top_k=50, seed=i,
                             eos=False) for i in range(s.engine_batch)]  # fmt: skip
    tokens = s.engine_batch * s.decode_tokens
    ways = {"compiled_run_ahead": (True, True), "compiled_step_by_step": (True, False),
            "eager_run_ahead": (False, True), "eager_step_by_step": (False, False)}
    texts: dict[str, list[list[int]]] = {}

    def run_way(way: str, engine: Engine) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            handles = [engine.submit(EngineRequest(p, sp))
                       for p, sp in zip(prompts.tolist(), params)]  # fmt: skip
            while engine.step():
                pass
            env.sync()
            elapsed = time.perf_counter() - start
            texts[way] = [h.result(timeout=0).token_ids for h in handles]
            assert all(len(ids) == s.decode_tokens for ids in texts[way])
            return elapsed

        return run

    runs = {way: run_way(way, Engine(model, max_batch=s.engine_batch, max_len=max_len,
                                     compile=compiled, run_ahead=run_ahead))
            for way, (compiled, run_ahead) in ways.items()}  # fmt: skip
    step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    runs["step_loop"] = lambda: _device_loop(env, model, step, prompts)
    timed = interleaved(runs, s.decode_reps)
    loop_s = timed.pop("step_loop")
    loop_tps = tokens / statistics.median(loop_s[1:])
    result: dict[str, Any] = {}
    for way, way_runs in timed.items():
        way_tps = tokens / statistics.median(way_runs[1:])
        result[way] = {"tokens_per_s": way_tps, "runs_s": way_runs,
                       "over_step_loop": way_tps / loop_tps}  # fmt: skip
    # Reported, not judged: bf16 sampled decoding on a GPU is not bitwise reproducible even
    # step by step (scripts/gpu_determinism.py); the gpu tests assert the equality in fp32.
    same = {"compiled": texts["compiled_run_ahead"] == texts["compiled_step_by_step"],
            "eager": texts["eager_run_ahead"] == texts["eager_step_by_step"]}
    return {
        "ok": True, "batch": s.engine_batch, "new_tokens": s.decode_tokens,
        "engine_tokens_per_s": result["compiled_run_ahead"]["tokens_per_s"],
        "step_loop_tokens_per_s": loop_tps,
        "engine_over_step_loop": result["compiled_run_ahead"]["over_step_loop"],
        "ways": result, "run_ahead_same_tokens": same, "loop_runs_s": loop_s,
        "sampling": "temperature 0.8, top_k 50, a seed per request",
        "ok_meaning": "measurement only (no target): the engine's cost over the bare step",
    }


def check_engine_hot_swap(env: Env) -> dict[str, Any]:
    """What a serving worker's compiled engine pays for a hot swap to a model of the same shapes.

    One-slot Engine(compile=True), seeded sampled requests of decode_tokens (random weights
    greedy-decode one token over and over, whatever the weights): the first (compiles and
    records), a warm one, then swap_model to other weights and two more. On a CPU the swap
    compiles no new graph (tests/unit/test_engine.py); on a GPU the CUDA graphs must take the
    new weights, and the first request after the swap shows what that costs.
    """
    from torch._dynamo.utils import counters

    from lmcore.engine import Engine, EngineRequest

    s = env.settings
    old, new = build(env, torch.bfloat16).eval(), build(env, torch.bfloat16, seed=1).eval()
    prompt = random_ids(env, 1, s.prompt_len)[0].tolist()
    params = SamplingParams(max_new_tokens=s.decode_tokens, temperature=1.0, seed=0, eos=False)
    engine = Engine(old, max_batch=1, max_len=s.prompt_len + s.decode_tokens, compile=True)

    def request() -> tuple[float, list[int]]:
        start = time.perf_counter()
        handle = engine.submit(EngineRequest(prompt, params))
        while engine.step():
            pass
        env.sync()
        return time.perf_counter() - start, handle.result(timeout=0).token_ids

    first_s, _ = request()
    warm_s, old_ids = request()
    graphs = counters["stats"].get("unique_graphs", 0)
    swap_start = time.perf_counter()
    assert engine.swap_model(new) is True
    swap_s = time.perf_counter() - swap_start
    after_s, new_ids = request()
    again_s, _ = request()
    return {
        "ok": new_ids != old_ids, "ok_meaning": "the swapped-in weights decide the tokens",
        "first_request_s_incl_compile": first_s, "warm_request_s": warm_s,
        "swap_model_s": swap_s, "first_request_after_swap_s": after_s,
        "second_request_after_swap_s": again_s,
        "first_after_swap_over_warm": after_s / warm_s,
        "graphs_compiled_by_the_swap": counters["stats"].get("unique_graphs", 0) - graphs,
        "new_tokens": s.decode_tokens, "batch": 1,
    }


def check_int8_decode(env: Env) -> dict[str, Any]:
    """Batch-1 greedy decode through a one-slot compiled Engine (the serving path): bf16 weights
    against the same weights quantized to int8 (`quantize_int8`: what LLM_QUANTIZED=true
    serves). A measurement, no target. Eager int8 layers convert their weight to bf16 before
    every product (on the CPU they read bytes instead, bench/quantized_cpu.json); whether the
    compiler fuses that conversion into the product decides what int8 costs on a GPU."""
    from lmcore.quantize import quantize_int8

    s = env.settings
    bf16 = build(env, torch.bfloat16).eval()
    int8 = quantize_int8(build(env, torch.bfloat16).eval())
    prompt = random_ids(env, 1, s.prompt_len)
    timed = interleaved({"bf16": lambda: _engine_run(env, bf16, prompt, run_ahead=True),
                         "int8": lambda: _engine_run(env, int8, prompt, run_ahead=True)},
                        s.decode_reps)  # fmt: skip
    tps = {way: s.decode_tokens / statistics.median(runs[1:]) for way, runs in timed.items()}
    return {
        "ok": True, "ok_meaning": "a measurement: both ways decoded every token",
        "bf16_tokens_per_s": tps["bf16"], "int8_tokens_per_s": tps["int8"],
        "int8_over_bf16": tps["int8"] / tps["bf16"],
        "first_rep_s_incl_compile": {way: runs[0] for way, runs in timed.items()},
        "runs_s": timed, "new_tokens": s.decode_tokens, "prompt_len": s.prompt_len, "batch": 1,
    }


def interleaved(runs: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Each way's seconds for `reps` runs: first one warm-up run of each way (it compiles and
    records CUDA graphs; kept as runs_s[0]), then the rest in rounds, one run of every way per
    round. A host that slows down or speeds up over the check then touches every way alike;
    run way by way, that drift (up to 35% on lent machines) read as a difference between ways."""
    seconds: dict[str, list[float]] = {name: [run()] for name, run in runs.items()}
    for _ in range(reps - 1):
        for name, run in runs.items():
            seconds[name].append(run())
    return seconds


@torch.inference_mode()
def _device_loop(env: Env, model: Transformer, step: Callable, prompt: torch.Tensor) -> float:
    """Seconds for decode_tokens compiled steps after an eager prefill into one static cache."""
    s = env.settings
    batch = prompt.shape[0]
    cache = _loop_cache(model, batch, s.prompt_len + s.decode_tokens)
    logits = prefill(model, prompt.tolist(), cache)
    token = logits.argmax(dim=-1, keepdim=True)
    pos = torch.full((batch, 1), s.prompt_len, device=env.device)
    env.sync()
    start = time.perf_counter()
    for _ in range(s.decode_tokens):
        # The previous step's logits are dead: CUDA graphs may reuse their memory.
        torch.compiler.cudagraph_mark_step_begin()
        logits = step(model, token, pos, cache)
        token = logits.argmax(dim=-1, keepdim=True)
        pos = pos + 1
    env.sync()
    return time.perf_counter() - start


def _engine_run(env: Env, model: Transformer, prompt: torch.Tensor, run_ahead: bool) -> float:
    """Seconds for one request through a one-slot compiled Engine, prefill to last token."""
    from lmcore.engine import Engine, EngineRequest

    s = env.settings
    key = (id(model), run_ahead)
    if key not in _ENGINES:
        _ENGINES[key] = Engine(model, max_batch=1, max_len=s.prompt_len + s.decode_tokens,
                               compile=True, run_ahead=run_ahead)  # fmt: skip
    engine = _ENGINES[key]
    params = SamplingParams(max_new_tokens=s.decode_tokens, temperature=0.0, eos=False)
    start = time.perf_counter()
    handle = engine.submit(EngineRequest(prompt[0].tolist(), params))
    while engine.step():
        pass
    env.sync()
    elapsed = time.perf_counter() - start
    assert len(handle.result(timeout=0).token_ids) == s.decode_tokens
    return elapsed


_ENGINES: dict[tuple[int, bool], Any] = {}
_CACHES: dict[tuple[int, int, int], KVCache] = {}


def _loop_cache(model: Transformer, batch: int, max_len: int) -> KVCache:
    # One cache for every rep: same addresses, so the recorded CUDA graph is replayed.
    key = (id(model), batch, max_len)
    if key not in _CACHES:
        _CACHES[key] = KVCache.for_model(model, batch, max_len)
    return _CACHES[key]


# ---------------------------------------------------------------- driver


CHECKS: dict[str, Callable[[Env], dict[str, Any]]] = {
    "flash_sdpa_bf16": check_flash_sdpa,
    "train_step_mfu": check_train_mfu,
    "trainer_vs_bare_step": check_trainer_vs_bare_step,
    "decode_compiled_b1": check_decode_compiled,
    "engine_batched_sampled": check_engine_batched,
    "engine_hot_swap": check_engine_hot_swap,
    "int8_decode_b1": check_int8_decode,  # last: a new measurement must not crowd out the rest
}


def host_speed(env: Env) -> dict[str, float]:
    """How fast this host runs Python, a small torch op and a kernel launch.

    The host-bound figures (generate_ids, the engine) moved by up to 35% between lent machines
    while the GPU-bound step loop stayed within 1%; these say how fast each host was.
    """
    start = time.perf_counter()
    total = 0
    for i in range(1_000_000):
        total += i
    python_ms = (time.perf_counter() - start) * 1e3
    x = torch.zeros(8)
    start = time.perf_counter()
    for _ in range(20_000):
        x = x.add(1)
    speed = {"python_1m_adds_ms": python_ms,
             "torch_cpu_op_us": (time.perf_counter() - start) / 20_000 * 1e6}  # fmt: skip
    if env.cuda:
        y = torch.zeros(8, device=env.device)
        env.sync()
        start = time.perf_counter()
        for _ in range(20_000):
            y.add_(1)  # queued, not waited for: the host's cost of one launch
        speed["cuda_launch_us"] = (time.perf_counter() - start) / 20_000 * 1e6
        env.sync()
    return speed


def meta(env: Env) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(),
        "device": str(env.device), "dry_run": env.dry_run, "settings": asdict(env.settings),
        "host_cpu": cpu_model(), "host_cpus": os.cpu_count(), "host_speed_start": host_speed(env),
    }
    if env.cuda:
        props = torch.cuda.get_device_properties(env.device)
        info |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                 "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda}
    return info


def run_check(name: str, fn: Callable[[Env], dict[str, Any]], env: Env) -> dict[str, Any]:
    """One check; an exception is recorded as a failed result so later checks still run."""
    start = time.perf_counter()
    try:
        result = fn(env)
    except Exception as exc:  # noqa: BLE001 - every failure is a result to report
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
    result["wall_s"] = round(time.perf_counter() - start, 2)
    if env.dry_run:
        result["ok_meaning"] = "dry run: the code path ran on CPU; targets do not apply"
    return result


def write(out: Path, doc: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")


def pending_doc(reason: str) -> dict[str, Any]:
    return {"status": "pending", "reason": reason, "command": COMMAND,
            "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON path "
                        "(default bench/lmcore_gpu.json; required with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU")
    parser.add_argument("--only", choices=sorted(CHECKS), action="append", help="run just these")
    parser.add_argument("--write-pending", action="store_true",
                        help="without CUDA, write a 'pending' record instead of failing")
    args = parser.parse_args(argv)
    if args.dry_run and args.out is None:
        parser.error("--dry-run needs --out (keeps bench/lmcore_gpu.json for real results)")
    out = args.out or DEFAULT_OUT
    if not args.dry_run and not torch.cuda.is_available():
        if args.write_pending:
            write(out, pending_doc("no CUDA device was available for this run"))
            print(json.dumps({"status": "pending", "out": str(out)}))
            return 0
        print("no CUDA device: use --dry-run to check the script, or --write-pending",
              file=sys.stderr)
        return 2
    env = Env(DRY if args.dry_run else GPU, torch.device("cpu" if args.dry_run else "cuda"),
              args.dry_run)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny ops: a second thread only adds barrier waits on a busy box
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (optimizer, norms) on TF32
    torch.backends.cudnn.allow_tf32 = True
    doc: dict[str, Any] = {"status": "partial", "meta": meta(env), "checks": {},
                           "command": COMMAND + (" --dry-run" if args.dry_run else "")}
    started = time.perf_counter()
    for name, fn in CHECKS.items():
        if args.only and name not in args.only:
            continue
        if time.perf_counter() - started > env.settings.budget_s:
            result = {"ok": False, "skipped": f"time budget {env.settings.budget_s:.0f}s spent"}
        else:
            result = run_check(name, fn, env)
            env.results[name] = result
        doc["checks"][name] = result
        print(json.dumps({"check": name, **result}), flush=True)
        write(out, doc)  # after every check, so a killed run still leaves what it measured
    doc["status"] = "done"
    doc["all_ok"] = all(r["ok"] for r in doc["checks"].values())
    doc["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
    doc["meta"]["host_speed_end"] = host_speed(env)
    write(out, doc)
    return 0 if doc["all_ok"] or args.dry_run else 1


if __name__ == "__main__":
    sys.exit(main())
