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

bf16 and fp16 weights are laid out the same way (the bag sums them in fp32 and rounds once), and
int8 linears (lmcore.quantize.Int8Linear) are measured for how many rows their byte bag beats
converting the whole weight first, and, with bf16 activations, for how many more rows
PyTorch's int8 weight-only GEMM does (it would overflow fp16: lmcore.quantize).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lmcore.linear import Linear, OneRowKernel, bag_linear, linear, onednn_enabled
from lmcore.quantize import (
    Int8Linear,
    byte_bag_product,
    byte_bag_supported,
    int8pack_product,
    int8pack_supported,
)

Order = Literal["row", "col"]
MAX_BAG_ROWS = 4  # beyond this the bag, which reads the weight once per row, never won here
# An int8 weight read through the byte bag is 1 byte against the 9 its conversion moves, so the
# bag wins at many more rows (crossing over at 12-16 on one Xeon; bench/quantized_cpu.json).
INT8_BAG_ROWS = (1, 2, 4, 8, 16)
TUNED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A timing stops taking passes once it has spent this long and has MIN_PASSES: a pass over a
# large model (or over gpt2-124m's int8 head, converted whole) takes 0.1-0.2 s on one core.
PASS_BUDGET_S = 0.25
MIN_PASSES = 3
# A product past every one-row kernel (a prefill, a batched decode step) takes `linear` on the
# weight in whatever order was chosen for one row. In fp32 both orders run it within ~10%, but
# a bf16 GEMM on a CPU without bf16 instructions (Zen 3) ran 4-16x slower on column-major
# weights, so a column-major order is kept only where products of MANY_ROWS rows on it take
# at most COL_MANY_ROWS_TOLERANCE times what they take on row-major.
MANY_ROWS = 16
COL_MANY_ROWS_TOLERANCE = 1.25
MANY_ROWS_PASSES = 2  # a product of many rows is compute-bound: steady from the first pass
# ...and its speed per weight is the same on a slice of the weight's rows, which bounds what
# the check costs a load (a 16-row bf16 product on gpt2-124m's column-major head took ~1 s).
MANY_ROWS_OUT = 4096


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
    chosen: str  # a Candidate's name; for int8 weights "bytebag", "int8pack" or "dequant"
    micros: dict[str, float]  # candidate name -> summed median microseconds per pass
    bag_rows: int = 1  # with a bag chosen: products of up to this many rows take it
    # rows ("2".."4"; "1".."16" for int8) -> {"bag": µs, "linear" or "dequant": µs}: how
    # bag_rows was decided; {"bag": µs} alone where the bag beat the other's time at fewer rows
    rows_micros: dict[str, dict[str, float]] = field(default_factory=dict)
    dtype: str = "float32"  # the weights' dtype: float32, bfloat16, float16 or int8
    pack_rows: int = 0  # int8: products of more than bag_rows, up to this many, take int8pack
    # float: weight order -> µs of one MANY_ROWS-row `linear` on one weight of this shape in
    # that order: "row" always, "col" where a column-major candidate was fastest for one row
    many_rows_micros: dict[str, float] = field(default_factory=dict)


def describe(choices: list[ShapeChoice]) -> str:
    """One line for a log: "1152x384 bag-col (<= 2 rows), 384x1536 onednn-row" (out x in)."""
    def one(c: ShapeChoice) -> str:
        kernels = c.chosen + (f" (<= {c.bag_rows} rows)" if c.bag_rows > 1 else "")
        if c.pack_rows > c.bag_rows:  # int8: the int8 GEMM after the bag, or alone
            pack = f"int8pack (<= {c.pack_rows} rows)"
            kernels = pack if c.chosen == "int8pack" else f"{kernels}, {pack}"
        dtype = "" if c.dtype == "float32" else f" {c.dtype}"
        return f"{c.shape[0]}x{c.shape[1]}{dtype} {kernels}"

    return ", ".join(one(c) for c in choices) or "none"


def candidates(dtype: torch.dtype = torch.float32) -> list[Candidate]:
    """The default (oneDNN row-major, where oneDNN runs fp32) first; the bag only column-major,
    the order whose transpose it reads in place. `linear` is F.linear but for fp32 on oneDNN.
    Row-major ones before column-major ones: timing them in this order transposes each weight
    once, where alternating did it three times (gpt2-124m's fp32 layout on one Zen 4 core:
    1.7-2.3 s instead of 2.3-3.1)."""
    use_onednn = onednn_enabled() and dtype == torch.float32
    kernels: list[OneRowKernel] = ["onednn", "blas"] if use_onednn else ["blas"]
    by_order = [Candidate(k, o) for o in ("row", "col") for k in kernels]
    return [*by_order, Candidate("bag", "col")]


def pick_fastest(micros: dict[str, float], default: str) -> str:
    """The fastest candidate; the default unless another beats it by more than 3% (noise)."""
    best = min(micros, key=micros.__getitem__)
    return default if micros[default] <= 1.03 * micros[best] else best


def pick_layout(micros: dict[str, float], many_rows_micros: dict[str, float], default: str) -> str:
    """`pick_fastest` among the candidates whose weight order does not slow products of many
    rows: column-major ones only where those take at most COL_MANY_ROWS_TOLERANCE times
    their row-major time (`default` is row-major)."""
    col, row = many_rows_micros.get("col"), many_rows_micros.get("row")
    if col is not None and row is not None and col > COL_MANY_ROWS_TOLERANCE * row:
        micros = {name: t for name, t in micros.items() if _candidate(name).order == "row"}
    return pick_fastest(micros, default)


def tunable_linears(model: nn.Module) -> list[Linear]:
    """lmcore Linear modules with fp32, bf16 or fp16 CPU weights, each weight once (a tied head
    counts once)."""
    seen: set[int] = set()
    found: list[Linear] = []
    for module in model.modules():
        if (
            isinstance(module, Linear)
            and module.weight.device.type == "cpu"
            and module.weight.dtype in TUNED_DTYPES
            and id(module.weight) not in seen
        ):
            seen.add(id(module.weight))
            found.append(module)
    return found


def int8_linears(model: nn.Module) -> list[Int8Linear]:
    """Int8Linear modules on the CPU, in model order (by their scales: a layer that keeps its
    packed copy alone has no `weight`)."""
    return [m for m in model.modules()
            if isinstance(m, Int8Linear) and m.scale.device.type == "cpu"]  # fmt: skip


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
    linears: Sequence[nn.Module],
    passes: int,
    rows: int = 1,
    product: Callable | None = None,
    dtype: torch.dtype | None = None,
) -> list[float]:
    """Median seconds of each module's product of `rows` rows over `passes` passes (after a
    warm one), or fewer once PASS_BUDGET_S is spent (at least MIN_PASSES): the module's own
    forward, or product(x, module); x in `dtype` (by default the weight's)."""
    gen = torch.Generator().manual_seed(0)  # a load must not move the caller's global RNG
    inputs = [torch.randn(rows, m.in_features, generator=gen).to(dtype or m.weight.dtype)
              for m in linears]  # fmt: skip
    samples: list[list[float]] = [[] for _ in linears]
    began = time.perf_counter()
    for rep in range(passes + 1):
        if rep > MIN_PASSES and time.perf_counter() - began > PASS_BUDGET_S:
            break  # passes this long are steady; more of them only delay the load
        for i, (module, x) in enumerate(zip(linears, inputs)):
            start = time.perf_counter()
            module(x) if product is None else product(x, module)
            if rep:  # the first pass only warms up (oneDNN builds a kernel per shape)
                samples[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def _shape_groups(linears: Sequence[nn.Module]) -> dict[tuple[int, int], list[int]]:
    """Weight shape (out, in) -> indices of the linears of that shape, in model order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, module in enumerate(linears):
        groups.setdefault((module.out_features, module.in_features), []).append(i)
    return groups


Family = tuple[str, list[nn.Module]]  # a dtype's name and its linears, in model order


def _families(model: nn.Module) -> list[Family]:
    """The model's tunable linears by weight dtype: each float dtype's Linears, then int8."""
    by_dtype: dict[str, list[nn.Module]] = {}
    for module in tunable_linears(model):
        by_dtype.setdefault(_dtype_name(module.weight.dtype), []).append(module)
    int8 = int8_linears(model)
    return [*by_dtype.items(), *([("int8", int8)] if int8 else [])]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _choice_names(dtype: str) -> set[str]:
    """What a choice for weights of this dtype may say; nothing for a dtype not tuned here."""
    if dtype == "int8":
        return {"bytebag", "int8pack", "dequant"}
    float_dtype = getattr(torch, dtype, None)
    return {c.name for c in candidates(float_dtype)} if float_dtype in TUNED_DTYPES else set()


def _reusable(families: list[Family], reuse: Sequence[ShapeChoice]) -> bool:
    """The earlier choices were made for the same linears: every dtype and shape, each as many
    times, and each choice still a candidate here."""
    wanted = {(dtype, shape): len(members)
              for dtype, linears in families for shape, members in _shape_groups(linears).items()}
    given = {(c.dtype, c.shape): c.modules for c in reuse}
    return wanted == given and all(c.chosen in _choice_names(c.dtype) for c in reuse)


def _apply_reused(
    families: list[Family], reuse: Sequence[ShapeChoice], activations: torch.dtype
) -> None:
    by_key = {(c.dtype, c.shape): c for c in reuse}
    for dtype, linears in families:
        for shape, members in _shape_groups(linears).items():
            choice = by_key[(dtype, shape)]
            for i in members:
                if dtype != "int8":
                    apply_candidate(linears[i], _candidate(choice.chosen))
                linears[i].bag_rows = choice.bag_rows
                linears[i].pack_rows = choice.pack_rows if dtype == "int8" else 0
                if dtype == "int8":
                    linears[i].settle_copies(activations)  # packed now, not at a request


def _candidate(name: str) -> Candidate:
    kernel, order = name.split("-")
    return Candidate(kernel, order)  # type: ignore[arg-type]


@torch.no_grad()
def use_inference_layout(
    model: nn.Module, *, passes: int = 7, reuse: Sequence[ShapeChoice] | None = None
) -> list[ShapeChoice]:
    """Give every CPU Linear (fp32, bf16 or fp16) the weight order and one-row kernel measured
    fastest here, and every CPU Int8Linear the most rows its byte bag measured faster for.

    Values and the state dict stay the same; only the memory order of weights and the kernel of
    one-row calls change, so results differ by rounding at most. Products of more rows
    (prefill, batched decode, training) keep `linear`, but for the 2-4 rows where a chosen bag
    measured faster (`ShapeChoice.bag_rows`), and a weight order is kept only where it does not
    make them slower (`pick_layout`). For loaded, eval-only models: a weight
    tied to the token embedding moves with it (a lookup reads a row either way). Returns the
    choice for each weight dtype and shape, with the timings behind it.

    `reuse`: the choices this process measured for another model; when they cover the same
    linears (same dtypes and shapes, as many of each) they are applied without timing anything.
    A serving worker swapping in a retrained model of the same architecture passes the old
    one's, so it does not measure while its engine shares the cores, and the weights' values
    never change a kernel's speed.
    """
    families = _families(model)
    if reuse and _reusable(families, reuse):
        _apply_reused(families, reuse, _activation_dtype(model))
        return list(reuse)
    choices: list[ShapeChoice] = []
    for dtype, linears in families:
        if dtype == "int8":
            choices += _tune_int8(linears, passes, _activation_dtype(model))
        else:
            choices += _tune_float(linears, passes)
    return choices


def _activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its first floating parameter's (int8 layers hold none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _tune_float(linears: list[nn.Module], passes: int) -> list[ShapeChoice]:
    """Time every candidate on every linear of one float dtype; keep the fastest per shape."""
    dtype = linears[0].weight.dtype
    groups = _shape_groups(linears)
    options = candidates(dtype)
    firsts = [linears[members[0]] for members in groups.values()]  # one linear of each shape
    timings: dict[str, list[float]] = {}
    for candidate in options:
        for module in linears:
            apply_candidate(module, candidate)
        timings[candidate.name] = _time_passes(linears, passes)
        if candidate == options[0]:  # row-major, the order products of many rows start from
            many_rows = dict(zip(groups, _time_many_rows(firsts)))

    default = options[0].name  # the order and kernel every Linear starts with
    choices = []
    for first, (shape, members) in zip(firsts, groups.items()):
        micros = {name: 1e6 * sum(t[i] for i in members) for name, t in timings.items()}
        chosen = pick_fastest(micros, default)
        many = {"row": 1e6 * many_rows[shape]}
        if _candidate(chosen).order == "col":  # what it would cost products of many rows
            apply_candidate(first, _candidate(chosen))
            many["col"] = 1e6 * _time_many_rows([first])[0]
            chosen = pick_layout(micros, many, default)
        for i in members:
            apply_candidate(linears[i], _candidate(chosen))
        choices.append(ShapeChoice(shape, len(members), chosen, micros,
                                   dtype=_dtype_name(dtype), many_rows_micros=many))  # fmt: skip
    return _with_bag_rows(choices, linears, groups, passes)


def _time_many_rows(linears: Sequence[nn.Module]) -> list[float]:
    """Seconds of a MANY_ROWS-row product through `linear` on (at most) the first
    MANY_ROWS_OUT rows of each linear's weight, in its present order."""
    weights = {id(m): leading_rows(m.weight, MANY_ROWS_OUT) for m in linears}

    def product(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
        bias = None if m.bias is None else m.bias[:MANY_ROWS_OUT]
        return linear(x, weights[id(m)], bias)

    return _time_passes(linears, MANY_ROWS_PASSES, MANY_ROWS, product)


def leading_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The first `rows` rows of a row- or column-major weight, dense and in the same order.

    A slice of a column-major weight is a strided view no serving product ever sees, and some
    kernels repack it on every call: oneDNN took 535 ms for 16 rows on 4,096 of the bench head's
    rows (Zen 5), against 1.1 ms on the whole column-major head. That would time the wrong
    thing and keep the head row-major (and cost a load 1.6 s).
    """
    if weight.shape[0] <= rows or weight.is_contiguous():
        return weight[:rows]
    return weight[:rows].t().contiguous().t()  # column-major: copy those rows, same order


def _with_bag_rows(
    choices: list[ShapeChoice],
    linears: list[nn.Module],
    groups: dict[tuple[int, int], list[int]],
    passes: int,
) -> list[ShapeChoice]:
    """For the shapes that chose the bag: the most rows (2..MAX_BAG_ROWS) up to which it still
    beats `linear` at every count, timed like one row, on those linears in model order."""
    bagged = {c.shape: groups[c.shape] for c in choices if _kernel_of(c) == "bag"}
    if not bagged:
        return choices
    won, rows_micros = _rows_the_bag_wins(
        linears, bagged, range(2, MAX_BAG_ROWS + 1), passes, won_already=1,
        bag=lambda x, m: bag_linear(x, m.weight, m.bias),
        plain=("linear", lambda x, m: linear(x, m.weight, m.bias)),
    )  # fmt: skip
    out = []
    for choice in choices:
        if choice.shape not in bagged:
            out.append(choice)
            continue
        for i in groups[choice.shape]:
            linears[i].bag_rows = won[choice.shape]
        out.append(dataclasses.replace(choice, bag_rows=won[choice.shape],
                                       rows_micros=rows_micros[choice.shape]))  # fmt: skip
    return out


# An int8 layer's product by converting its whole weight: what the faster kernels must beat.
_DEQUANT = ("dequant", lambda x, m: m.dequant_product(x))


def _tune_int8(
    layers: list[nn.Module], passes: int, activations: torch.dtype
) -> list[ShapeChoice]:
    """For each int8 shape: the most rows (of INT8_BAG_ROWS) up to which the byte bag beats the
    next kernel at every count, then (bf16 activations, where `int8pack_supported`) the
    most rows up to which the int8 weight-only GEMM beats converting the weight (to the
    `activations` dtype); 0 (never the bag) where the kernel is missing."""
    groups = _shape_groups(layers)
    for layer in layers:  # timed from the int8 weight (a layout measured again had released it)
        layer.drop_packed_rows()
    if not byte_bag_supported():
        for layer in layers:
            layer.bag_rows = layer.pack_rows = 0
        return [ShapeChoice(shape, len(members), "dequant", {}, 0, dtype="int8")
                for shape, members in groups.items()]  # fmt: skip
    int8pack = ("int8pack", int8pack_product)
    packable = {s: m for s, m in groups.items() if int8pack_supported(activations, s[1])}
    others = {s: m for s, m in groups.items() if s not in packable}
    won: dict[tuple[int, int], int] = {}
    rows_micros: dict[tuple[int, int], dict[str, dict[str, float]]] = {}
    # The bag against the stronger of the rest at few rows: int8pack where it runs.
    for shapes, plain in ((others, _DEQUANT), (packable, int8pack)):
        if shapes:
            got, micros = _rows_the_bag_wins(
                layers, shapes, INT8_BAG_ROWS, passes, won_already=0, dtype=activations,
                bag=byte_bag_product, plain=plain,
            )  # fmt: skip
            won.update(got)
            rows_micros.update(micros)
    pack_won = _rows_int8pack_wins(layers, packable, won, rows_micros, passes, activations)
    choices = []
    for shape, members in groups.items():
        pack_rows = pack_won.get(shape, 0)
        for i in members:
            layers[i].bag_rows, layers[i].pack_rows = won[shape], pack_rows
            layers[i].settle_copies(activations)  # one copy where only the bag reads bytes
        at_one_row = rows_micros[shape].get("1", {})
        micros = {("bytebag" if k == "bag" else k): v for k, v in at_one_row.items()}
        chosen = "bytebag" if won[shape] else ("int8pack" if pack_rows else "dequant")
        choices.append(ShapeChoice(shape, len(members), chosen, micros, won[shape],
                                   rows_micros[shape], "int8", pack_rows))  # fmt: skip
    return choices


def _rows_int8pack_wins(
    layers: list[nn.Module],
    packable: dict[tuple[int, int], list[int]],
    bag_won: dict[tuple[int, int], int],
    rows_micros: dict[tuple[int, int], dict[str, dict[str, float]]],
    passes: int,
    activations: torch.dtype,
) -> dict[tuple[int, int], int]:
    """For each packable shape, from the first count beyond its bag_rows: the most rows up to
    which int8pack beats converting the weight (its bag_rows where it never does). Adds the
    timings to rows_micros, "int8pack" and "dequant" at each count timed."""
    pack_won: dict[tuple[int, int], int] = {}
    for start in sorted({bag_won[s] for s in packable}):
        shapes = {s: m for s, m in packable.items() if bag_won[s] == start}
        got, micros = _rows_the_bag_wins(
            layers, shapes, [c for c in INT8_BAG_ROWS if c > start], passes, won_already=start,
            dtype=activations, bag=int8pack_product,
            plain=_DEQUANT,
        )  # fmt: skip
        pack_won.update(got)
        for shape, by_count in micros.items():
            for count, timed in by_count.items():
                named = {("int8pack" if k == "bag" else k): v for k, v in timed.items()}
                rows_micros[shape].setdefault(count, {}).update(named)
    return pack_won


def _rows_the_bag_wins(
    modules: list[nn.Module],
    groups: dict[tuple[int, int], list[int]],
    counts: Sequence[int],
    passes: int,
    *,
    won_already: int,
    dtype: torch.dtype | None = None,
    bag: Callable[[torch.Tensor, nn.Module], torch.Tensor],
    plain: tuple[str, Callable[[torch.Tensor, nn.Module], torch.Tensor]],
) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], dict[str, dict[str, float]]]]:
    """Time `bag` against the `plain` product at each row count, on the modules of the shapes
    still in play, in model order (inputs in `dtype`, by default the weight's), until each shape
    first loses. Returns each shape's last winning count (won_already if none) and the timings:
    count -> {"bag": µs, plain name: µs}, or {"bag": µs} alone where the bag beat the plain
    product's time at fewer rows, which more rows do not make faster (so it was not timed)."""
    plain_name, plain_product = plain
    won = {shape: won_already for shape in groups}
    rows_micros: dict[tuple[int, int], dict[str, dict[str, float]]] = {s: {} for s in groups}
    plain_before: dict[tuple[int, int], float] = {}  # µs of the plain product at fewer rows
    still_winning = set(groups)
    for rows in counts:
        if not still_winning:
            break
        # Settled shapes are not timed again: one shape that keeps winning (an int8 head, up to
        # 16 rows) must not have every other linear of the model timed at each count with it.
        bag_micros = _summed_micros(modules, groups, still_winning, passes, rows, bag, dtype)
        # Nor is a plain product the bag already beats at fewer rows: gpt2-124m's int8 head is
        # converted whole each time (~0.1 s), and the bag wins there up to 8 or 16 rows.
        undecided = {shape for shape in still_winning if shape not in plain_before
                     or pick_fastest({"bag": bag_micros[shape], plain_name: plain_before[shape]},
                                     plain_name) != "bag"}  # fmt: skip
        plain_micros = _summed_micros(
            modules, groups, undecided, passes, rows, plain_product, dtype
        ) if undecided else {}  # fmt: skip
        for shape in list(still_winning):
            micros = {"bag": bag_micros[shape]}
            if shape in plain_micros:
                micros[plain_name] = plain_before[shape] = plain_micros[shape]
            rows_micros[shape][str(rows)] = micros
            if plain_name not in micros or pick_fastest(micros, plain_name) == "bag":
                won[shape] = rows
            else:
                still_winning.discard(shape)  # from its first loss on, the shape is settled
    return won, rows_micros


def _summed_micros(
    modules: list[nn.Module],
    groups: dict[tuple[int, int], list[int]],
    shapes: set[tuple[int, int]],
    passes: int,
    rows: int,
    product: Callable[[torch.Tensor, nn.Module], torch.Tensor],
    dtype: torch.dtype | None,
) -> dict[tuple[int, int], float]:
    """Each shape's summed median µs of `product`, timed on its modules in model order."""
    members = sorted(i for shape in shapes for i in groups[shape])
    seconds = dict(zip(members, _time_passes([modules[i] for i in members], passes, rows,
                                             product, dtype)))  # fmt: skip
    return {shape: 1e6 * sum(seconds[i] for i in groups[shape]) for shape in shapes}


def _kernel_of(choice: ShapeChoice) -> str:
    return choice.chosen.split("-", 1)[0]  # "bag-col" -> "bag"
