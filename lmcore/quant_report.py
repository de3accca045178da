"""What int8 would cost a trained model: size and validation loss in full precision, with
weight-only int8 and with PyTorch dynamic int8, as flat numbers for the trainer's report.

Measures copies only: it must not modify the model it is given, nor define int8 layers
(lmcore.quantize does).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lmcore.quantize import dynamic_int8, model_size_bytes, quantize_int8


def _windows(tokens: Any, block_size: int, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spaced (x, y) windows: deterministic, so both models see the same text."""
    data = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    if data.ndim != 1 or len(data) < block_size + 1:
        raise ValueError(f"val_tokens must be 1-D with more than block_size ({block_size}) tokens")
    starts = np.linspace(0, len(data) - block_size - 1, num=windows).astype(np.int64)
    chunks = np.stack([data[s : s + block_size + 1].astype(np.int64) for s in starts])
    chunk = torch.from_numpy(chunks)
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


@torch.inference_mode()
def eval_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 8
) -> float:
    """Mean next-token cross-entropy over the windows (x, y), evaluated in batches."""
    device = next(iter(model.parameters())).device
    losses = []
    for i in range(0, len(x), batch_size):
        _, loss = model(x[i : i + batch_size].to(device), y[i : i + batch_size].to(device))
        losses.append(float(loss) * len(x[i : i + batch_size]))
    return sum(losses) / len(x)


def quantization_report(
    model: nn.Module,
    val_tokens: Any,
    block_size: int,
    *,
    windows: int = 8,
    batch_size: int = 8,
    skip: Sequence[str] = (),
    include_dynamic: bool = False,
) -> dict[str, float]:
    """Sizes and validation loss of the model, its weight-only int8 copy (and dynamic int8,
    where this torch has it).

    Flat numbers, ready for mlflow.log_metrics. The given model is not modified.
    """
    x, y = _windows(val_tokens, block_size, windows)
    was_training = model.training
    try:
        return _report(model.eval(), x, y, batch_size, skip, include_dynamic)
    finally:
        model.train(was_training)


def _report(
    base: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    skip: Sequence[str],
    include_dynamic: bool,
) -> dict[str, float]:
    int8 = quantize_int8(copy.deepcopy(base), skip=skip)
    report = {
        "windows": float(x.shape[0]),
        "block_size": float(x.shape[1]),
        "base_bytes": float(model_size_bytes(base)),
        "base_val_loss": eval_loss(base, x, y, batch_size=batch_size),
        "int8_bytes": float(model_size_bytes(int8)),
        "int8_val_loss": eval_loss(int8, x, y, batch_size=batch_size),
    }
    report["int8_size_ratio"] = report["int8_bytes"] / report["base_bytes"]
    report["int8_val_loss_delta"] = report["int8_val_loss"] - report["base_val_loss"]
    if include_dynamic:
        try:
            dyn = dynamic_int8(base, skip=skip)
        except RuntimeError:  # this torch has no quantize_dynamic: report weight-only int8 alone
            return report
        report["dynamic_int8_bytes"] = float(model_size_bytes(dyn))
        report["dynamic_int8_val_loss"] = eval_loss(dyn, x, y, batch_size=batch_size)
        report["dynamic_int8_size_ratio"] = report["dynamic_int8_bytes"] / report["base_bytes"]
        report["dynamic_int8_val_loss_delta"] = (
            report["dynamic_int8_val_loss"] - report["base_val_loss"]
        )
    return report
