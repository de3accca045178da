"""Lay out an inference model's CPU linears for one-row products, choosing by measurement.

A batch-1 decode step multiplies one row by every weight, so its speed is how fast a kernel
streams the weights from memory. Which kernel (oneDNN, PyTorch's default BLAS, or the
embedding-bag sum of lmcore.linear.bag_linear) on which weight order (row- or column-major)
streams fastest depends on the machine and the shape: on one AMD EPYC VM oneDNN led or tied on
most shapes, on another (a busier host) the BLAS on column-major weights read tall shapes
1.5-1.8x faster than oneDNN, and on a third the bag read every shape ~1.7x faster than either
(bench/linear_cpu.json, `matvec`). A fixed rule is wrong somewhere, so this times the
candidates on the model's own weights, in model order (each weight comes from memory as in a
decode step, not from a warm cache), and keeps the fastest for each weight shape. The bag reads
a weight once per row, yet it can still beat a GEMM at two or three rows (a serving engine with
a few requests in flight), so where it is chosen the same measurement finds how many rows it
keeps.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lmcore.linear import Linear, OneRowKernel, bag_linear, linear, onednn_enabled

Order = Literal["row", "col"]
MAX_BAG_ROWS = 4  # beyond this the bag, which reads the weight once per row, never won here


@dataclass(frozen=True)
class Candidate:
    kernel: OneRowKernel
    order: Order

    @property
    def name(self) -> str:
        return f"{self.kernel}-{self.order}"


@dataclass(frozen=True)
class ShapeChoice:
    """The candidate kept for every Linear of one weight shape, with what each one took."""

    shape: tuple[int, int]  # (out_features, in_features)
    modules: int
    chosen: str
    micros: dict[str, float]  # candidate name -> summed median microseconds per pass
    bag_rows: int = 1  # with the bag chosen: products of up to this many rows take it
    # rows ("2".."4") -> {"bag": µs, "linear": µs}: how bag_rows was decided
    rows_micros: dict[str, dict[str, float]] = field(default_factory=dict)


def describe(choices: list[ShapeChoice]) -> str:
    """One line for a log: "1152x384 bag-col (<= 2 rows), 384x1536 onednn-row" (out x in)."""
    def one(c: ShapeChoice) -> str:
        rows = f" (<= {c.bag_rows} rows)" if c.bag_rows > 1 else ""
        return f"{c.shape[0]}x{c.shape[1]} {c.chosen}{rows}"

    return ", ".join(one(c) for c in choices) or "none"


def candidates() -> list[Candidate]:
    """The default (oneDNN row-major, where oneDNN runs) first; the bag only column-major, the
    order whose transpose it reads in place."""
    kernels: list[OneRowKernel] = ["onednn", "blas"] if onednn_enabled() else ["blas"]
    both_orders = [Candidate(k, o) for k in kernels for o in ("row", "col")]
    return [*both_orders, Candidate("bag", "col")]


def pick_fastest(micros: dict[str, float], default: str) -> str:
    """The fastest candidate; the default unless another beats it by more than 3% (noise)."""
    best = min(micros, key=micros.__getitem__)
    return default if micros[default] <= 1.03 * micros[best] else best


def tunable_linears(model: nn.Module) -> list[Linear]:
    """lmcore Linear modules with fp32 CPU weights, each weight once (a tied head counts once)."""
    seen: set[int] = set()
    found: list[Linear] = []
    for module in model.modules():
        if (
            isinstance(module, Linear)
            and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32
            and id(module.weight) not in seen
        ):
            seen.add(id(module.weight))
            found.append(module)
    return found


def apply_candidate(module: Linear, candidate: Candidate) -> None:
    """Store the module's weight in the candidate's order and route its one-row calls."""
    weight = module.weight.data
    if candidate.order == "col":
        # (out, in) with strides (1, out): the transpose of a contiguous (in, out) matrix.
        module.weight.data = weight.t().contiguous().t()
    else:
        module.weight.data = weight.contiguous()
    module.one_row_kernel = candidate.kernel
    module.bag_rows = 1


def _time_passes(
    linears: list[Linear], passes: int, rows: int = 1, product: Callable | None = None
) -> list[float]:
    """Median seconds of each module's product of `rows` rows over `passes` passes (after a
    warm one): the module's own forward, or product(x, weight, bias)."""
    inputs = [torch.randn(rows, m.in_features) for m in linears]
    samples: list[list[float]] = [[] for _ in linears]
    for rep in range(passes + 1):
        for i, (module, x) in enumerate(zip(linears, inputs)):
            start = time.perf_counter()
            module(x) if product is None else product(x, module.weight, module.bias)
            if rep:  # the first pass only warms up (oneDNN builds a kernel per shape)
                samples[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def _shape_groups(linears: list[Linear]) -> dict[tuple[int, int], list[int]]:
    """Weight shape (out, in) -> indices of the linears of that shape, in model order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, module in enumerate(linears):
        groups.setdefault((module.out_features, module.in_features), []).append(i)
    return groups


def _reusable(groups: dict[tuple[int, int], list[int]], reuse: Sequence[ShapeChoice]) -> bool:
    """The earlier choices were made for the same linears: every shape, each as many times."""
    by_shape = {c.shape: c for c in reuse}
    return set(groups) == set(by_shape) and all(
        len(members) == by_shape[shape].modules for shape, members in groups.items()
    )


@torch.no_grad()
def use_inference_layout(
    model: nn.Module, *, passes: int = 7, reuse: Sequence[ShapeChoice] | None = None
) -> list[ShapeChoice]:
    """Give every fp32 CPU Linear the weight order and one-row kernel measured fastest here.

    Values and the state dict stay the same; only the memory order of weights and the kernel of
    one-row calls change, so results differ by fp32 rounding at most. Products of more rows
    (prefill, batched decode, training) keep `linear`, but for the 2-4 rows where a chosen bag
    measured faster (`ShapeChoice.bag_rows`). For loaded, eval-only models: a weight
    tied to the token embedding moves with it (a lookup reads a row either way). Returns the
    choice for each weight shape, with the timings behind it.

    `reuse`: the choices this process measured for another model; when they cover the same
    linears (same shapes, as many of each) they are applied without timing anything. A serving
    worker swapping in a retrained model of the same architecture passes the old one's, so it
    does not measure while its engine shares the cores, and the weights' values never change a
    kernel's speed.
    """
    linears = tunable_linears(model)
    if not linears:
        return []
    groups = _shape_groups(linears)
    options = candidates()
    by_name = {c.name: c for c in options}
    if reuse and _reusable(groups, reuse) and all(c.chosen in by_name for c in reuse):
        for choice in reuse:
            for i in groups[choice.shape]:
                apply_candidate(linears[i], by_name[choice.chosen])
                linears[i].bag_rows = choice.bag_rows
        return list(reuse)
    timings: dict[str, list[float]] = {}
    for candidate in options:
        for module in linears:
            apply_candidate(module, candidate)
        timings[candidate.name] = _time_passes(linears, passes)

    default = options[0].name  # the order and kernel every Linear starts with
    choices = []
    for shape, members in groups.items():
        micros = {name: 1e6 * sum(t[i] for i in members) for name, t in timings.items()}
        chosen = pick_fastest(micros, default)
        for i in members:
            apply_candidate(linears[i], by_name[chosen])
        choices.append(ShapeChoice(shape, len(members), chosen, micros))
    return _with_bag_rows(choices, linears, groups, passes)


def _with_bag_rows(
    choices: list[ShapeChoice],
    linears: list[Linear],
    groups: dict[tuple[int, int], list[int]],
    passes: int,
) -> list[ShapeChoice]:
    """For the shapes that chose the bag: the most rows (2..MAX_BAG_ROWS) up to which it still
    beats `linear` at every count, timed like one row, on those linears in model order."""
    bagged = [c for c in choices if _kernel_of(c) == "bag"]
    members = [i for c in bagged for i in groups[c.shape]]
    if not members:
        return choices
    mods = [linears[i] for i in members]
    position = {i: n for n, i in enumerate(members)}
    rows_micros: dict[tuple[int, int], dict[str, dict[str, float]]] = {c.shape: {} for c in bagged}
    bag_rows = {c.shape: 1 for c in bagged}
    still_winning = {c.shape for c in bagged}
    for rows in range(2, MAX_BAG_ROWS + 1):
        if not still_winning:
            break
        bag = _time_passes(mods, passes, rows, bag_linear)
        plain = _time_passes(mods, passes, rows, linear)
        for shape in list(still_winning):
            at = [position[i] for i in groups[shape]]
            micros = {"bag": 1e6 * sum(bag[n] for n in at),
                      "linear": 1e6 * sum(plain[n] for n in at)}  # fmt: skip
            rows_micros[shape][str(rows)] = micros
            if pick_fastest(micros, "linear") == "bag":
                bag_rows[shape] = rows
            else:
                still_winning.discard(shape)  # from its first loss on, the shape is settled
    out = []
    for choice in choices:
        if _kernel_of(choice) != "bag":
            out.append(choice)
            continue
        for i in groups[choice.shape]:
            linears[i].bag_rows = bag_rows[choice.shape]
        out.append(ShapeChoice(choice.shape, choice.modules, choice.chosen, choice.micros,
                               bag_rows[choice.shape], rows_micros[choice.shape]))  # fmt: skip
    return out


def _kernel_of(choice: ShapeChoice) -> str:
    return choice.chosen.split("-", 1)[0]  # "bag-col" -> "bag"
