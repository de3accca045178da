"""nn.Linear whose fp32 CPU matmuls run through oneDNN where it beats PyTorch's default CPU BLAS.

PyTorch's x86 CPU builds hand fp32 matmuls to Intel MKL, which runs its AVX-512 kernels only on
Intel processors and falls back to AVX2 elsewhere. oneDNN, shipped in the same builds, picks
kernels by instruction set alone: on an AMD EPYC with AVX-512 (Zen 5) it runs the model's GEMMs
~2.1x faster than MKL, but on one without (Zen 3), where both run AVX2, MKL's kernels are the
faster ones (oneDNN 0.73x, median; bench/README.md). So oneDNN is used exactly where MKL leaves
AVX-512 unused: an AVX-512 CPU that is not Intel's (`LMCORE_ONEDNN_LINEAR` overrides). Results
differ from F.linear only by fp32 rounding; every other case (CUDA, bf16/fp16, autocast,
torch.compile, non-x86) is plain F.linear. Products of a single row may take another kernel
(`Linear.one_row_kernel`), chosen per machine by lmcore.inference_layout.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# LMCORE_ONEDNN_LINEAR: "1" oneDNN wherever its op runs, "0" never, unset (or "auto") where
# MKL would leave AVX-512 unused. Read once, at the first linear call.
ENV_SWITCH = "LMCORE_ONEDNN_LINEAR"


@functools.cache
def onednn_supported() -> bool:
    """oneDNN's linear op exists in this torch build and runs on this (x86) CPU."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # aarch64 builds route oneDNN through other kernels; not measured there
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...), or "" when unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    # Windows names the vendor in the processor string; macOS on x86 is Intel-only anyway.
    return next((v for v in ("GenuineIntel", "AuthenticAMD", "HygonGenuine")
                 if v in platform.processor()), "")  # fmt: skip


def mkl_leaves_avx512_unused() -> bool:
    """MKL is the CPU BLAS and this CPU has AVX-512, which MKL uses only on Intel processors."""
    return (
        torch.backends.mkl.is_available()
        and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        and cpu_vendor() not in ("GenuineIntel", "")
    )


@functools.cache
def onednn_enabled() -> bool:
    """Whether fp32 CPU linears go through oneDNN here: see ENV_SWITCH and the module docstring."""
    switch = os.environ.get(ENV_SWITCH, "auto").strip().lower()
    if switch == "0" or not onednn_supported():
        return False
    return switch == "1" or mkl_leaves_avx512_unused()


def gemm_library() -> str:
    """What fp32 CPU GEMMs run on here, for logs and reports: "oneDNN" or "BLAS" (F.linear)."""
    return "oneDNN" if onednn_enabled() else "BLAS"


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias with oneDNN, whatever onednn_enabled() says; any strides (a transposed
    view is read, not copied)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """Forward and backward of a linear layer, each product a oneDNN matmul."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        return onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            grad_x = onednn_linear(grad, weight.t(), None)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            x_2d = x.reshape(-1, x.shape[-1])  # (N, in)
            grad_w = onednn_linear(grad_2d.t(), x_2d.t(), None)  # (out, N) @ (N, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:  # type: ignore[attr-defined]
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
        and x.shape[-1] == weight.shape[1]  # else F.linear names the mismatch; oneDNN can't
        and not torch.is_autocast_enabled("cpu")  # autocast wants F.linear to cast to bf16
        and not torch.compiler.is_compiling()  # inductor has its own oneDNN lowering
        and onednn_enabled()
    )


@functools.cache
def bag_indices(n: int, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices 0..n-1 once per row and each row's bag offset, made once per (n, rows, device);
    ordinary tensors even when first asked for under inference_mode."""
    with torch.inference_mode(False):
        offsets = torch.arange(0, rows * n, n, device=device)
        return torch.arange(n, device=device).repeat(rows), offsets


def bag_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for a few rows of x, each a weighted sum of the rows of weight.T.

    Each row of x is one bag of F.embedding_bag over every row of the (in, out) matrix weight.T,
    weighted by that row: on x86 builds that is FBGEMM's embedding kernel, which streams a
    column-major weight (weight.T contiguous) from memory about 1.7x faster than oneDNN's or the
    BLAS's one-row product (bench/linear_cpu.json, `matvec`). It reads the weight once per row,
    so it pays off for one row and sometimes two or three (lmcore.inference_layout measures
    where). Any weight order gives the same result; a row-major one is copied first.
    """
    rows = x.numel() // weight.shape[1]
    indices, offsets = bag_indices(weight.shape[1], rows, weight.device)
    out = F.embedding_bag(indices, weight.t(), offsets, mode="sum",
                          per_sample_weights=x.reshape(-1))  # fmt: skip
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, through oneDNN for fp32 on a CPU where onednn_enabled()."""
    if not _use_onednn(x, weight):
        return F.linear(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        return _OneDNNLinear.apply(x, weight, bias)
    return onednn_linear(x, weight, bias)  # inference: no autograd Function on the decode path


OneRowKernel = Literal["onednn", "blas", "bag"]


class Linear(nn.Linear):
    """A drop-in nn.Linear (same parameters, same state dict) using `linear` above.

    one_row_kernel picks the kernel of products of a single row (batch-1 decode): "onednn"
    (`linear`), "blas" (F.linear) or "bag" (`bag_linear`), and with "bag", products of up to
    `bag_rows` rows take it too; lmcore.inference_layout sets both to what measured fastest.
    Other products, and every product torch.compile traces, take `linear`.
    """

    one_row_kernel: OneRowKernel = "onednn"
    bag_rows: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (
            self.one_row_kernel == "onednn"
            or rows == 0
            or x.shape[-1] != self.in_features  # `linear` raises torch's own shape error
            or torch.compiler.is_compiling()  # the compiler lowers products its own way
        ):
            return linear(x, self.weight, self.bias)
        if self.one_row_kernel == "blas" and rows == 1:
            return F.linear(x, self.weight, self.bias)
        # The bag has no autocast rule and wants x in the weight's dtype: `linear` has both.
        if (
            self.one_row_kernel == "bag"
            and rows <= self.bag_rows
            and x.dtype == self.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        ):
            return bag_linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)


def shared_weight_ids(model: nn.Module) -> set[int]:
    """ids of the weight tensors that more than one module holds (a head tied to an embedding)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners[id(weight)] = owners.get(id(weight), 0) + 1
    return {ident for ident, count in owners.items() if count > 1}
