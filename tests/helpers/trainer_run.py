"""A trainer process for the distributed tests: alone, under torchrun, or as a PyTorchJob pod.

Trains with lmcore.train.Trainer on a prepared token cache and writes what the tests compare
(final weights and a result JSON per rank, and the tracker calls each rank made); it asserts
nothing itself and must not mock torch.distributed.

    python -m tests.helpers.trainer_run --dataset CACHE_DIR --out OUT_DIR [--steps N] ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from lmcore.checkpoint import unwrap_model
from lmcore.config import preset
from lmcore.data import TokenDataset, WindowSampler, prepare_corpus
from lmcore.distributed import DistEnv
from lmcore.train import Trainer, TrainConfig


WORDS = ("the king queen lord lady speaks loves hates sees a my thy good noble fair foul night "
         "day sword crown").split()


def write_corpus(path: Path, lines: int = 20_000, seed: int = 0) -> Path:
    """A small learnable corpus: short sentences over a 20-word vocabulary."""
    import random

    rng = random.Random(seed)
    text = "\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + "."
        for _ in range(lines)
    )
    path.write_text(text + "\n", encoding="utf-8")
    return path


def tiny_corpus(root: Path, lines: int) -> tuple[Path, TokenDataset]:
    """A corpus file under root and its token cache, with the tiny preset's vocabulary (512)."""
    text = write_corpus(root / "corpus.txt", lines=lines)
    return text, prepare_corpus(text, root / "cache", vocab_size=512, progress=False)


class RecordingTracker:
    """Appends one JSON line per call (with the caller's rank) to a file; forwards to `inner`."""

    def __init__(self, path: Path, inner: Any = None) -> None:
        self.path = path
        self.inner = inner
        self.rank = DistEnv.from_env().rank

    def _record(self, method: str, **fields: Any) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"rank": self.rank, "pid": os.getpid(), "method": method,
                                **fields}) + "\n")

    def start_run(self, experiment: str, run_id: str | None, params: dict[str, Any]) -> Any:
        new_id = self.inner.start_run(experiment, run_id, params) if self.inner else run_id
        new_id = new_id or "recorded-run"
        self._record("start_run", experiment=experiment, run_id=new_id)
        return new_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._record("log_metrics", step=step, metrics=metrics)
        if self.inner:
            self.inner.log_metrics(metrics, step)

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
        self._record("log_artifact", path=str(path))
        if self.inner:
            self.inner.log_artifact(path, artifact_path)

    def log_model_dir(self, model_dir: Any, register_name: str | None,
                      alias: str = "candidate") -> Any:
        self._record("log_model_dir", model_dir=str(model_dir), register_name=register_name)
        return self.inner.log_model_dir(model_dir, register_name, alias) if self.inner else None

    def end_run(self, status: str) -> None:
        self._record("end_run", status=status)
        if self.inner:
            self.inner.end_run(status)


class UnionSampler:
    """One process's batch = the batches ranks 0..world-1 would draw, concatenated in rank order.

    With it, a 1-process run sees exactly the windows of a `world`-process DDP run.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 world: int) -> None:
        self.parts = [WindowSampler(tokens, block_size, batch_size, seed=seed, rank=r,
                                    world_size=world) for r in range(world)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(p.next_batch() for p in self.parts))
        return torch.cat(xs), torch.cat(ys)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [p.state_dict() for p in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p, s in zip(self.parts, state["parts"]):
            p.load_state_dict(s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, required=True, help="a prepare_corpus cache dir")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-time", type=float, default=None, help="train.max_time_s")
    p.add_argument("--batch-size", type=int, default=4, help="windows per rank per micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--union-of-ranks", type=int, default=0,
                   help="draw the union of this many ranks' windows (1-process reference run)")
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument("--checkpoint-interval", type=int, default=0)
    p.add_argument("--lock-wait", type=float, default=60.0, help="train.checkpoint_lock_wait_s")
    p.add_argument("--dist-timeout", type=float, default=120.0, help="train.dist_timeout_s")
    p.add_argument("--eval-interval", type=int, default=0)
    p.add_argument("--mlflow-uri", default=None, help="also log to MLflow (lmcore.tracking)")
    p.add_argument("--first-step-sleep", type=float, default=0.0,
                   help="make the first optimizer step this much slower (as compiling one is)")
    return p.parse_args(argv)


def slow_first_step(seconds: float) -> None:
    """The first optimizer step of this process takes `seconds` longer, as a compiling one does."""
    import time

    step, slept = Trainer._optimizer_step, []

    def slowed(self: Trainer, lr: float) -> Any:
        if not slept:
            slept.append(True)
            time.sleep(seconds)
        return step(self, lr)

    Trainer._optimizer_step = slowed  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.first_step_sleep:
        slow_first_step(args.first_step_sleep)
    dataset = TokenDataset.load(args.dataset)
    rank = DistEnv.from_env().rank
    args.out.mkdir(parents=True, exist_ok=True)
    model_cfg = preset("tiny", vocab_size=dataset.tokenizer.vocab_size,
                       block_size=args.block_size)
    train_cfg = TrainConfig(
        batch_size=args.batch_size, grad_accum_steps=args.grad_accum, max_steps=args.steps,
        max_time_s=args.max_time,
        lr=args.lr, warmup_steps=args.warmup, eval_interval=args.eval_interval, eval_batches=2,
        log_interval=1, checkpoint_interval=args.checkpoint_interval,
        checkpoint_dir=str(args.checkpoint_dir) if args.checkpoint_dir else None,
        model_dir=str(args.out / "model"), device="cpu", progress=False,
        dist_timeout_s=args.dist_timeout, checkpoint_lock_wait_s=args.lock_wait,
    )
    inner = None
    if args.mlflow_uri:
        from lmcore.tracking import MlflowTracker

        inner = MlflowTracker(args.mlflow_uri)
    tracker = RecordingTracker(args.out / f"calls.rank{rank}.jsonl", inner)
    factory = None
    if args.union_of_ranks:
        world = args.union_of_ranks

        def factory(tokens, block, batch, seed, _rank, _world):  # noqa: ANN001, ANN202
            return UnionSampler(tokens, block, batch, seed, world)

    kwargs = {"sampler_factory": factory} if factory else {}
    trainer = Trainer(model_cfg, train_cfg, dataset, tracker, experiment="trainer-run-test",
                      register_name="trainer-run-test", **kwargs)
    result = trainer.fit()
    weights = {k: v.detach().contiguous().clone()
               for k, v in unwrap_model(trainer.model).state_dict().items()
               if k != "head.weight"}  # tied to tok_emb.weight
    save_file(weights, args.out / f"rank{rank}.safetensors")
    summary = {
        "rank": rank,
        "world_size": trainer.dist_env.world_size,
        "steps": result.steps,
        "elapsed_s": result.elapsed_s,
        "stopped_by_time": result.stopped_by_time,
        "final_val_loss": result.final_val_loss,
        "tokens_per_s": result.tokens_per_s,
        "run_id": result.run_id,
        "model_dir": str(result.model_dir) if result.model_dir else None,
        "history": result.history,
        "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                              "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")},
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
