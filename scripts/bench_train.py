"""Training throughput: tokens/s for 1 process and for N-process DDP, and data loading's time share.

Runs lmcore.train.Trainer on a synthetic memmapped token file (the real data path); it measures,
it must not tune anything. Each configuration is a fresh process (torchrun for DDP).

    python scripts/bench_train.py     # CPU, small model, 1 and 2 processes -> bench/train_cpu.json
    python scripts/bench_train.py --device cuda --model gpt2-124m --nproc 1 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python scripts/bench_train.py`
    sys.path.insert(0, str(REPO))

from scripts.bench_meta import provenance  # noqa: E402

SYNTHETIC_TOKENS = 4_000_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="small", help="tiny | small | gpt2-124m")
    p.add_argument("--batch-size", type=int, default=8, help="windows per process per step")
    p.add_argument("--block-size", type=int, default=None, help="default: the model's")
    p.add_argument("--steps", type=int, default=6, help="timed steps (after 1 warm-up step)")
    p.add_argument("--nproc", default=None,
                   help="comma-separated process counts (default: 1,2 on CPU, 1 on CUDA)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="default bench/train_<device>.json")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- one measured configuration (runs inside the child process) ---------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch

    from lmcore.config import preset
    from lmcore.distributed import DistEnv
    from lmcore.train import Trainer, TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg = preset(args.model)
    if args.block_size:
        model_cfg = model_cfg.replace(block_size=args.block_size)
    tokens = _synthetic_tokens(model_cfg.vocab_size)
    dataset = SimpleNamespace(train=tokens, val=tokens[: 1 << 16], tokenizer=None, meta={})
    cfg = TrainConfig(
        batch_size=args.batch_size, max_steps=args.steps + 1, warmup_steps=1,
        eval_interval=0, eval_batches=1, log_interval=args.steps + 1, checkpoint_dir=None,
        device=args.device, mixed_precision=args.precision, compile=args.compile,
        progress=False,
    )
    trainer = Trainer(model_cfg, cfg, dataset)
    result = trainer.fit()
    env = DistEnv.from_env()
    if env.is_main:
        out: dict[str, Any] = {
            "processes": env.world_size,
            "threads_per_process": torch.get_num_threads(),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "data_time_share": round(result.data_time_share, 5),
            "tokens_per_step": args.batch_size * env.world_size * model_cfg.block_size,
            "timed_steps": args.steps,
            "precision": trainer.precision.name,
        }
        if args.device == "cuda":
            fpt = trainer.model.flops_per_token(model_cfg.block_size)
            out["mfu"] = round(fpt * result.tokens_per_s / (cfg.peak_flops * env.world_size), 4)
            out["gpu"] = torch.cuda.get_device_name()
            out["max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        args.worker.write_text(json.dumps(out))


def _synthetic_tokens(vocab_size: int):  # noqa: ANN202
    """A uint16 token file opened as a memmap, as lmcore.data serves a real corpus."""
    import numpy as np

    path = Path(tempfile.gettempdir()) / f"bench-train-{vocab_size}-{SYNTHETIC_TOKENS}.bin"
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    if not path.exists() or path.stat().st_size != SYNTHETIC_TOKENS * np.dtype(dtype).itemsize:
        rng = np.random.default_rng(0)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        rng.integers(0, vocab_size, SYNTHETIC_TOKENS, dtype=dtype).tofile(tmp)
        os.replace(tmp, path)
    return np.memmap(path, dtype=dtype, mode="r")


# -- the driver ----------------------------------------------------------------------------------


def _model_block(name: str) -> int:
    from lmcore.config import preset

    return preset(name).block_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_config(args: argparse.Namespace, nproc: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        inner = [str(Path(__file__).resolve()), "--worker", str(result), "--threads",
                 str(threads), "--device", args.device, "--model", args.model,
                 "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                 "--precision", args.precision]
        if args.block_size:
            inner += ["--block-size", str(args.block_size)]
        if args.compile:
            inner.append("--compile")
        if nproc == 1:
            cmd = [sys.executable, *inner]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                   "--nproc-per-node", str(nproc), "--master-port", str(_free_port()), *inner]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        row = json.loads(result.read_text())
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    cores = os.cpu_count() or 1
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    counts = [int(n) for n in (args.nproc or ("1,2" if args.device == "cpu" else "1")).split(",")]
    configs: list[tuple[int, int]] = []
    for n in counts:
        if args.device == "cpu":
            configs.append((n, max(1, cores // n)))  # the same cores, split between processes
            if n == 1 and cores > 1:
                configs.append((1, 1))  # one process on one core: the per-core baseline
        else:
            configs.append((n, max(1, cores // n)))
    rows = []
    for n, threads in configs:
        print(f"bench: {n} process(es) x {threads} thread(s) ...", file=sys.stderr, flush=True)
        rows.append(run_config(args, n, threads))
        print(f"  {rows[-1]['tokens_per_s']:.0f} tokens/s, data loading "
              f"{100 * rows[-1]['data_time_share']:.2f}% of the time", file=sys.stderr)
    out = args.out or REPO / "bench" / f"train_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        **provenance(__file__, argv),
        "device": args.device,
        "model": args.model,
        "block_size": args.block_size or _model_block(args.model),
        "batch_size_per_process": args.batch_size,
        "data": f"synthetic uint16 memmap ({SYNTHETIC_TOKENS} tokens), lmcore.data.WindowSampler",
        "machine": {"cpus": cores, "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "load_average_at_start": load_at_start,
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "results": rows,
        "date": time.strftime("%Y-%m-%d"),
    }
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
