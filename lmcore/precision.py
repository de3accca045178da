"""Mixed precision policy: which dtype to autocast to, and whether a GradScaler is needed.

One place decides bf16 / fp16 / fp32 for training and inference; it must not build models.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

PrecisionName = Literal["auto", "bf16", "fp16", "fp32"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    device_type: str

    @property
    def name(self) -> str:
        return {v: k for k, v in _DTYPES.items()}[self.dtype]

    @property
    def needs_grad_scaler(self) -> bool:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range.
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_grad_scaler)


def _cuda_has_bf16(device: torch.device) -> bool:
    """Whether this GPU computes in bf16 natively (compute capability 8.0, Ampere, or newer).
    Not `torch.cuda.is_bf16_supported()`: it also counts emulation, so it says True on a V100
    or T4, where bf16 runs slowly and fp16 with a GradScaler is the right choice."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(
    requested: PrecisionName | bool | None, device: torch.device | str
) -> Precision:
    """`auto` (or True): bf16 where the GPU supports it, else fp16 on CUDA; fp32 on CPU.

    False / None / "fp32" keep full precision. An explicit bf16/fp16 is honoured on any device.
    """
    device = torch.device(device)
    if requested is False or requested is None:
        requested = "fp32"
    if requested is True:
        requested = "auto"
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if _cuda_has_bf16(device) else "fp16"
        else:
            requested = "fp32"
    if requested not in _DTYPES:
        raise ValueError(
            f"mixed_precision must be auto, bf16, fp16, fp32 or a bool, got {requested!r}"
        )
    return Precision(_DTYPES[requested], device.type)


def inference_dtype(precision: Precision) -> torch.dtype | None:
    """The dtype inference casts weights to, or None to keep them as saved (fp32 casts nothing:
    a model saved in bf16 serves in bf16). Inference needs no autocast: the weights (and so the
    KV cache) simply take the dtype."""
    return None if precision.dtype == torch.float32 else precision.dtype
