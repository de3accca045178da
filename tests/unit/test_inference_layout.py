"""lmcore.inference_layout: measured weight order and one-row kernel, same results either way."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lmcore import inference_layout as layout
from lmcore.cache import KVCache
from lmcore.checkpoint import load_model_dir, save_model_dir
from lmcore.config import preset
from lmcore.generate import decode_step
from lmcore.linear import Linear, onednn_enabled
from lmcore.model import Transformer
from lmcore.quantize import (
    Int8Linear,
    byte_bag_supported,
    int8pack_supported,
    model_size_bytes,
    packed_alone_serves,
    quantize_int8,
)

pytestmark = pytest.mark.unit


def _order(weight: torch.Tensor) -> str:
    if weight.is_contiguous():
        return "row"
    assert weight.stride() == (1, weight.shape[0]), weight.stride()
    return "col"


class FakeClock:
    """Stands in for `time` in the layout module: time passes only when a product says so, so
    timing tests decide the same way on a loaded machine (sleeps overshoot there)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(layout, "time", fake)
    return fake


def _cached_logits(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """Prefill all but the last token, then one decode step (one row): both paths run."""
    cache = KVCache.for_model(model, 1, idx.shape[1])
    prefix = idx[:, :-1]
    pos = torch.arange(prefix.shape[1])[None]
    model(prefix, input_pos=pos, cache=cache)
    step_pos = torch.tensor([[prefix.shape[1]]])
    return model(idx[:, -1:], input_pos=step_pos, cache=cache)[0]


def test_pick_fastest_keeps_the_default_within_noise_and_takes_a_clear_winner() -> None:
    assert layout.pick_fastest({"onednn-row": 102.0, "blas-col": 100.0}, "onednn-row") == (
        "onednn-row"
    )
    assert layout.pick_fastest({"onednn-row": 150.0, "blas-col": 100.0}, "onednn-row") == (
        "blas-col"
    )


def test_a_column_major_order_that_slows_many_row_products_is_not_chosen() -> None:
    one_row = {"blas-row": 925.0, "blas-col": 12577.0, "bag-col": 719.0}
    # bf16 on a Zen 3 core: the bag is the fastest single row, but 16 rows on its order took
    # 13.7x the row-major time.
    assert layout.pick_layout(one_row, {"row": 13737.0, "col": 187616.0}, "blas-row") == (
        "blas-row"
    )
    assert layout.pick_layout(one_row, {"row": 13737.0, "col": 14000.0}, "blas-row") == "bag-col"
    assert layout.pick_layout(one_row, {}, "blas-row") == "bag-col"  # nothing measured: as before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tuning_times_many_row_products_and_keeps_column_major_only_where_they_stay_cheap(
    dtype: torch.dtype,
) -> None:
    model = Transformer(preset("tiny")).eval().to(dtype)
    with torch.no_grad():
        choices = layout.use_inference_layout(model, passes=3)
    for choice in choices:
        many = choice.many_rows_micros
        assert many["row"] > 0, choice.shape
        fastest_one_row = layout.pick_fastest(choice.micros, layout.candidates(dtype)[0].name)
        # Column-major costs are timed where column-major won one row, and kept if cheap.
        assert ("col" in many) == fastest_one_row.endswith("-col"), choice
        if choice.chosen.endswith("-col"):
            assert many["col"] <= layout.COL_MANY_ROWS_TOLERANCE * many["row"], choice


def test_many_row_timing_uses_the_leading_rows_densely_in_the_weights_own_order() -> None:
    weight = torch.randn(40, 8)
    col = weight.t().contiguous().t()
    part = layout.leading_rows(col, 16)
    assert part.stride() == (1, 16) and _order(part) == "col"  # dense, not a strided view
    assert torch.equal(part, weight[:16])
    assert layout.leading_rows(weight, 16).data_ptr() == weight.data_ptr()  # row-major: a view
    assert layout.leading_rows(col, 64).shape == (40, 8)  # fewer rows than asked: all of them


def test_many_row_timing_sees_a_column_major_weight_as_serving_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The timed product gets a dense column-major weight, never the strided slice some
    # kernels repack on every call (oneDNN: 535 ms against 1.1 ms on the whole weight).
    seen: list[tuple[int, ...]] = []
    real = layout.linear

    def recording(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        seen.append(weight.stride())
        return real(x, weight, bias)

    monkeypatch.setattr(layout, "MANY_ROWS_OUT", 16)
    monkeypatch.setattr(layout, "linear", recording)
    module = nn.Linear(8, 40)
    layout.apply_candidate(module, layout.Candidate("blas", "col"))
    layout._time_many_rows([module])
    assert seen and set(seen) == {(1, 16)}


def test_candidates_cover_both_orders_of_every_gemm_kernel_and_the_column_major_bag() -> None:
    names = [c.name for c in layout.candidates()]
    assert {"blas-row", "blas-col", "bag-col"} <= set(names) and "bag-row" not in names
    assert ("onednn-row" in names) == onednn_enabled()
    assert names[0] == ("onednn-row" if onednn_enabled() else "blas-row")  # the default


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_candidates_change_the_weight_order_once(dtype: torch.dtype) -> None:
    # Timing them in turn transposes every weight at each change of order.
    orders = [c.order for c in layout.candidates(dtype)]
    assert orders == sorted(orders, key=["row", "col"].index) and orders[0] == "row"


EVERY_CANDIDATE = [layout.Candidate(k, o) for k in ("onednn", "blas") for o in ("row", "col")]
EVERY_CANDIDATE.append(layout.Candidate("bag", "col"))


@pytest.mark.parametrize("candidate", EVERY_CANDIDATE, ids=lambda c: c.name)
def test_every_candidate_gives_the_model_its_logits(
    candidate: layout.Candidate, request: pytest.FixtureRequest
) -> None:
    if candidate.kernel == "onednn":
        request.getfixturevalue("onednn_forced")  # a candidate only where oneDNN is chosen
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        before = _cached_logits(model, idx)
        for module in layout.tunable_linears(model):
            layout.apply_candidate(module, candidate)
        after = _cached_logits(model, idx)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert _order(model.head.weight) == candidate.order
    assert model.head.weight is model.tok_emb.weight  # the tie survives a new order


@pytest.mark.parametrize("kernel, op", [("blas", "aten::addmm"), ("bag", "aten::embedding_bag")])
def test_one_row_calls_take_the_chosen_kernel_and_batches_the_gemm(kernel: str, op: str) -> None:
    torch.manual_seed(1)
    lin = Linear(32, 48)
    layout.apply_candidate(lin, layout.Candidate(kernel, "col"))  # type: ignore[arg-type]

    def ops(rows: int) -> set[str]:
        x = torch.randn(rows, 32)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            out = lin(x)
        torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias))
        return {event.key for event in prof.key_averages()}

    one_row = ops(1)
    assert op in one_row and "mkldnn::_linear_pointwise" not in one_row
    batch = ops(4)  # more rows than bag_rows: the GEMM path
    if onednn_enabled():
        assert "mkldnn::_linear_pointwise" in batch and op not in batch
    else:
        assert "aten::linear" in batch and "aten::embedding_bag" not in batch


def test_tuning_applies_its_reported_choice_to_every_linear_and_keeps_values() -> None:
    torch.manual_seed(2)
    model = Transformer(preset("tiny")).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, 11))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = _cached_logits(model, idx)
        choices = layout.use_inference_layout(model, passes=3)
        after = _cached_logits(model, idx)

    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    names = {c.name for c in layout.candidates()}
    by_shape = {c.shape: c for c in choices}
    linears = layout.tunable_linears(model)
    assert set(by_shape) == {(m.out_features, m.in_features) for m in linears}
    assert sum(c.modules for c in choices) == len(linears)
    for module in linears:
        choice = by_shape[(module.out_features, module.in_features)]
        assert set(choice.micros) == names and all(t > 0 for t in choice.micros.values())
        kernel, order = choice.chosen.split("-")
        assert (module.one_row_kernel, _order(module.weight)) == (kernel, order)


def test_describe_names_each_shape_and_its_choice() -> None:
    choices = [layout.ShapeChoice((1152, 384), 6, "blas-col", {}),
               layout.ShapeChoice((384, 1536), 6, "onednn-row", {}),
               layout.ShapeChoice((384, 384), 6, "bag-col", {}, bag_rows=2),
               layout.ShapeChoice((64, 64), 2, "bytebag", {}, bag_rows=8, dtype="int8")]
    assert layout.describe(choices) == (
        "1152x384 blas-col, 384x1536 onednn-row, 384x384 bag-col (<= 2 rows), "
        "64x64 int8 bytebag (<= 8 rows)"
    )
    assert layout.describe([]) == "none"


def test_models_off_the_cpu_are_left_alone() -> None:
    model = quantize_int8(Transformer(preset("tiny")).eval()).to("meta")
    assert layout.use_inference_layout(model) == []
    assert all(m.weight.is_contiguous() and m.one_row_kernel == "onednn"
               for m in model.modules() if isinstance(m, Linear))  # fmt: skip
    assert {m.bag_rows for m in model.modules() if isinstance(m, Int8Linear)} == {0}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_models_are_laid_out_in_their_own_dtype_and_keep_their_logits(
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(10)
    model = Transformer(preset("tiny")).to(dtype).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        before = _cached_logits(model, idx)
        choices = layout.use_inference_layout(model, passes=2)
        after = _cached_logits(model, idx)

    # oneDNN's op is fp32-only, so half weights choose among F.linear's orders and the bag.
    names = {"blas-row", "blas-col", "bag-col"}
    assert [c.name for c in layout.candidates(dtype)] == ["blas-row", "blas-col", "bag-col"]
    assert {c.dtype for c in choices} == {str(dtype).removeprefix("torch.")}
    assert sum(c.modules for c in choices) == len(layout.tunable_linears(model))
    for module in layout.tunable_linears(model):
        [choice] = [c for c in choices if c.shape == (module.out_features, module.in_features)]
        assert set(choice.micros) == names and choice.chosen in names
        assert (module.one_row_kernel, _order(module.weight)) == tuple(choice.chosen.split("-"))
        assert module.weight.dtype == dtype
    # Every kernel sums in fp32 and rounds once; only the order of the sum differs.
    torch.testing.assert_close(after, before, rtol=0.02, atol=0.02)


def test_int8_layers_take_the_byte_bag_for_as_many_rows_as_it_keeps_winning() -> None:
    torch.manual_seed(11)
    model = quantize_int8(Transformer(preset("tiny")).eval())
    idx = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        before = _cached_logits(model, idx)
        choices = layout.use_inference_layout(model, passes=2)
        after = _cached_logits(model, idx)

    layers = layout.int8_linears(model)
    int8 = [c for c in choices if c.dtype == "int8"]
    assert sum(c.modules for c in int8) == len(layers) > 0
    for choice in int8:
        counts = [int(r) for r in choice.rows_micros]
        assert counts == list(layout.INT8_BAG_ROWS[: len(counts)])
        wins = _bag_wins(choice.rows_micros, "dequant")
        # Counts are timed until the bag first loses; bag_rows is the last count it won.
        won = [r for r, w in zip(counts, wins) if w]
        assert wins == [True] * len(won) + [False] * (len(counts) - len(won))
        assert choice.bag_rows == (won[-1] if won else 0)
        assert choice.chosen == ("bytebag" if won else "dequant")
        shape = choice.shape
        assert {m.bag_rows for m in layers if (m.out_features, m.in_features) == shape} == {
            choice.bag_rows
        }
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_loaded_model_reports_its_layout_and_saves_again(tmp_path) -> None:
    torch.manual_seed(4)
    model = Transformer(preset("tiny")).eval()
    loaded = load_model_dir(save_model_dir(tmp_path / "a", model))
    assert {c.shape for c in loaded.layout} == {
        (m.out_features, m.in_features) for m in layout.tunable_linears(model)
    }
    # Column-major weights (whatever was measured here) save as ordinary tensors and load back.
    for module in layout.tunable_linears(loaded.model):
        layout.apply_candidate(module, layout.Candidate("blas", "col"))
    again = load_model_dir(save_model_dir(tmp_path / "b", loaded.model)).model
    idx = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(again(idx)[0], model(idx)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["blas", "bag"])
def test_a_compiled_batch_1_step_of_a_tuned_model_traces_plain_products(kernel: str) -> None:
    torch.manual_seed(5)
    model = Transformer(preset("tiny")).eval()
    for module in layout.tunable_linears(model):
        layout.apply_candidate(module, layout.Candidate(kernel, "col"))  # type: ignore[arg-type]
    cache = KVCache.for_model(model, 1, 16)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), input_pos=torch.arange(3)[None], cache=cache)
        explanation = torch._dynamo.explain(decode_step)(
            model, torch.tensor([[4]]), torch.tensor([[3]]), cache
        )
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    traced = explanation.graphs[0].code
    assert "linear" in traced and "embedding_bag" not in traced and "addmm" not in traced


def _stamped(choices: list[layout.ShapeChoice], chosen: str) -> list[layout.ShapeChoice]:
    """The same shapes with another choice and timings no measurement would give."""
    return [layout.ShapeChoice(c.shape, c.modules, chosen, {chosen: 1.0}) for c in choices]


def test_int8_choices_are_reused_and_told_apart_from_float_ones() -> None:
    torch.manual_seed(12)
    first = quantize_int8(Transformer(preset("tiny")).eval())
    earlier = [layout.ShapeChoice(c.shape, c.modules, c.chosen, {"stamp": 1.0}, 3, {}, c.dtype)
               if c.dtype == "int8" else c
               for c in layout.use_inference_layout(first, passes=1)]  # fmt: skip
    second = quantize_int8(Transformer(preset("tiny")).eval())
    assert layout.use_inference_layout(second, reuse=earlier) == earlier
    assert {m.bag_rows for m in layout.int8_linears(second)} == {3}
    # The bytes are packed with the layout, not by the first request's step.
    layer = layout.int8_linears(second)[0]
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(torch.randn(1, layer.in_features))
    assert "aten::cat" not in {e.key for e in prof.key_averages()}
    # The same shapes in fp32 are other linears: measured, not given the int8 choices.
    plain = Transformer(preset("tiny")).eval()
    assert {c.dtype for c in layout.use_inference_layout(plain, passes=1, reuse=earlier)} == {
        "float32"
    }


@pytest.mark.skipif(not byte_bag_supported() or not int8pack_supported(torch.bfloat16, 64),
                    reason="needs FBGEMM's byte bag and the CPU int8 weight GEMM")
def test_bf16_int8_layers_get_int8pack_rows_beyond_the_bag_where_it_is_safe() -> None:
    torch.manual_seed(13)
    model = quantize_int8(Transformer(preset("tiny")).eval().to(torch.bfloat16))
    idx = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        before = _cached_logits(model, idx)
        choices = layout.use_inference_layout(model, passes=2)
        after = _cached_logits(model, idx)
    torch.testing.assert_close(after.float(), before.float(), rtol=0.05, atol=0.05)

    layers = layout.int8_linears(model)
    for choice in choices:
        assert choice.pack_rows == 0 or choice.pack_rows >= max(choice.bag_rows, 1)
        members = [m for m in layers if (m.out_features, m.in_features) == choice.shape]
        assert {(m.bag_rows, m.pack_rows) for m in members} == {(choice.bag_rows,
                                                                 choice.pack_rows)}
        # Every tiny shape's inner size suits the op: the bag is timed against it at one row.
        assert "int8pack" in choice.rows_micros["1"]
        assert choice.chosen == ("bytebag" if choice.bag_rows else
                                 "int8pack" if choice.pack_rows else "dequant")  # fmt: skip

    reused = quantize_int8(Transformer(preset("tiny")).eval().to(torch.bfloat16))
    assert layout.use_inference_layout(reused, reuse=choices) == choices
    assert [(m.bag_rows, m.pack_rows) for m in layout.int8_linears(reused)] == [
        (m.bag_rows, m.pack_rows) for m in layers
    ]


def test_choices_for_the_same_linears_are_reused_without_measuring() -> None:
    torch.manual_seed(6)
    first = Transformer(preset("tiny")).eval()
    earlier = _stamped(layout.use_inference_layout(first, passes=1), "bag-col")
    second = Transformer(preset("tiny")).eval()
    idx = torch.randint(0, second.config.vocab_size, (1, 7))
    with torch.no_grad():
        before = _cached_logits(second, idx)
        choices = layout.use_inference_layout(second, reuse=earlier)
        after = _cached_logits(second, idx)

    assert choices == earlier  # the stamped timings came back: nothing was timed
    assert all((m.one_row_kernel, _order(m.weight)) == ("bag", "col")
               for m in layout.tunable_linears(second))  # fmt: skip
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_choices_for_other_linears_are_measured_afresh() -> None:
    torch.manual_seed(7)
    earlier = _stamped(layout.use_inference_layout(Transformer(preset("tiny")).eval(), passes=1),
                       "bag-col")  # fmt: skip
    deeper = Transformer(preset("tiny", n_layer=preset("tiny").n_layer + 1)).eval()
    choices = layout.use_inference_layout(deeper, passes=1, reuse=earlier)
    names = {c.name for c in layout.candidates()}
    assert all(set(c.micros) == names for c in choices)  # timed: every candidate has a figure
    assert sum(c.modules for c in choices) == len(layout.tunable_linears(deeper))


def _bag_wins(rows_micros: dict[str, dict[str, float]], plain: str) -> list[bool]:
    """Whether the bag won at each count: against the plain product's time at that count or,
    where that was not timed, at the last count where it was."""
    wins, before = [], None
    for micros in rows_micros.values():
        before = micros.get(plain, before)
        assert before is not None, "the plain product is timed at the first count"
        wins.append(layout.pick_fastest({"bag": micros["bag"], plain: before}, plain) == "bag")
    return wins


def test_bag_rows_grow_while_the_bag_keeps_winning_and_reach_every_module() -> None:
    torch.manual_seed(8)
    model = Transformer(preset("tiny")).eval()
    linears = layout.tunable_linears(model)
    for module in linears:
        layout.apply_candidate(module, layout.Candidate("bag", "col"))
    groups = layout._shape_groups(linears)
    bagged = [layout.ShapeChoice(shape, len(m), "bag-col", {}) for shape, m in groups.items()]
    choices = layout._with_bag_rows(bagged, linears, groups, passes=3)

    for choice in choices:
        timed = [int(r) for r in choice.rows_micros]
        assert timed == list(range(2, 2 + len(timed)))
        assert 1 <= len(timed) <= layout.MAX_BAG_ROWS - 1
        wins = _bag_wins(choice.rows_micros, "linear")
        # Counts are timed until the bag first loses; bag_rows is the last count it won.
        assert wins == [True] * (choice.bag_rows - 1) + [False] * (len(timed) - choice.bag_rows + 1)
        assert {linears[i].bag_rows for i in groups[choice.shape]} == {choice.bag_rows}


def test_a_decode_step_of_a_few_rows_through_the_bag_gives_the_same_logits() -> None:
    torch.manual_seed(9)
    model = Transformer(preset("tiny")).eval()
    idx = torch.randint(0, model.config.vocab_size, (3, 6))

    def step_logits() -> torch.Tensor:  # prefill 5 tokens of 3 rows, then one 3-row step
        cache = KVCache.for_model(model, 3, 6)
        model(idx[:, :-1], input_pos=torch.arange(5).expand(3, 5), cache=cache)
        return model(idx[:, -1:], input_pos=torch.full((3, 1), 5), cache=cache)[0]

    with torch.no_grad():
        before = step_logits()
        for module in layout.tunable_linears(model):
            layout.apply_candidate(module, layout.Candidate("bag", "col"))
            module.bag_rows = 3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            after = step_logits()
    assert "aten::embedding_bag" in {e.key for e in prof.key_averages()}
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_settled_shapes_are_not_timed_again_while_another_keeps_winning(clock: FakeClock) -> None:
    # Two shapes: the bag always loses on the narrow one and always wins on the wide one (each
    # product waits a fixed time), so only the wide one is timed at the later counts.
    narrow, wide = nn.Linear(8, 4), nn.Linear(8, 16)
    modules = [narrow, wide, narrow]
    seen: dict[int, set[int]] = {}

    def product(slow_on: nn.Module) -> Callable[[torch.Tensor, nn.Module], None]:
        def run(x: torch.Tensor, module: nn.Module) -> None:
            seen.setdefault(x.shape[0], set()).add(module.out_features)
            clock.spend(0.004 if module is slow_on else 0.0005)
        return run

    groups = layout._shape_groups(modules)
    won, rows_micros = layout._rows_the_bag_wins(
        modules, groups, (1, 2, 4), passes=1, won_already=0,
        bag=product(slow_on=narrow), plain=("plain", product(slow_on=wide)),
    )  # fmt: skip
    assert won == {(4, 8): 0, (16, 8): 4}
    assert seen == {1: {4, 16}, 2: {16}, 4: {16}}
    assert list(rows_micros[(4, 8)]) == ["1"] and list(rows_micros[(16, 8)]) == ["1", "2", "4"]


def test_a_plain_product_the_bag_beat_at_fewer_rows_is_not_timed_again(clock: FakeClock) -> None:
    # The bag's time grows with rows, the plain product's does not (a weight converted whole):
    # the plain one is timed at 1 row, skipped at 2 (the bag still beats its 1-row time), and
    # timed again at 4, where the bag no longer does.
    module = nn.Linear(8, 4)
    plain_rows: list[int] = []

    def bag(x: torch.Tensor, m: nn.Module) -> None:
        clock.spend(0.001 * x.shape[0])

    def plain(x: torch.Tensor, m: nn.Module) -> None:
        plain_rows.append(x.shape[0])
        clock.spend(0.0035)

    won, rows_micros = layout._rows_the_bag_wins(
        [module], {(4, 8): [0]}, (1, 2, 4, 8), passes=1, won_already=0,
        bag=bag, plain=("plain", plain),
    )  # fmt: skip
    assert sorted(set(plain_rows)) == [1, 4]
    assert [sorted(m) for m in rows_micros[(4, 8)].values()] == [
        ["bag", "plain"], ["bag"], ["bag", "plain"]
    ]
    assert won == {(4, 8): 2}


def test_timing_takes_fewer_passes_once_its_budget_is_spent(clock: FakeClock) -> None:
    calls = {"slow": 0, "fast": 0}

    def counted(name: str, seconds: float) -> Callable[[torch.Tensor, nn.Module], None]:
        def run(x: torch.Tensor, module: nn.Module) -> None:
            calls[name] += 1
            clock.spend(seconds)
        return run

    module = nn.Linear(4, 4)
    slow_s = 1.5 * layout.PASS_BUDGET_S / layout.MIN_PASSES
    layout._time_passes([module], 7, product=counted("slow", slow_s))
    layout._time_passes([module], 7, product=counted("fast", 0.0))
    assert calls == {"slow": layout.MIN_PASSES + 1, "fast": 7 + 1}  # the first pass warms up


@pytest.mark.skipif(not byte_bag_supported(), reason="this torch build has no FBGEMM byte bag")
@pytest.mark.parametrize("bag", ["as measured", "slower everywhere"])
def test_int8_layers_keep_the_packed_copy_only_where_the_bag_serves(
    bag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if bag == "slower everywhere":
        real = layout.byte_bag_product

        def slow(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
            time.sleep(0.002)
            return real(x, layer)

        monkeypatch.setattr(layout, "byte_bag_product", slow)
    model = quantize_int8(Transformer(preset("tiny")).eval())
    layout.use_inference_layout(model, passes=1)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    # Timing the bag packs every layer; a layer that never takes it must not keep the bytes,
    # and one whose few rows all take it keeps them alone (fp32 activations: no int8pack).
    assert all((m.packed_nbytes > 0) == (m.bag_rows > 0) for m in layers)
    alone = packed_alone_serves(torch.float32)  # fp32 GEMMs on oneDNN (lmcore.quantize)
    assert all((m.weight is None) == (alone and m.bag_rows > 0) for m in layers)
    if bag == "slower everywhere":
        assert all(m.bag_rows == 0 for m in layers)


def _resident_bytes(model: nn.Module) -> int:
    """What a served model holds: model_size_bytes (which counts a packed copy that replaced
    its weight) plus the packed copies kept beside an int8 weight."""
    beside = sum(m.packed_nbytes for m in layout.int8_linears(model) if m.weight is not None)
    return model_size_bytes(model) + beside


def _int8_choices(model: nn.Module, bag_rows: int, pack_rows: int) -> list[layout.ShapeChoice]:
    groups = layout._shape_groups(layout.int8_linears(model))
    return [layout.ShapeChoice(shape, len(members), "bytebag", {}, bag_rows, dtype="int8",
                               pack_rows=pack_rows) for shape, members in groups.items()]


@pytest.mark.skipif(not byte_bag_supported(), reason="this torch build has no FBGEMM byte bag")
@pytest.mark.parametrize("bag_rows, pack_rows, dtype", [
    (4, 0, torch.float32), (1, 0, torch.float32), (4, 16, torch.float32), (4, 0, torch.bfloat16)
], ids=["bag_alone", "bag_one_row", "bag_and_int8pack", "bf16"])  # fmt: skip
def test_a_laid_out_int8_model_holds_one_copy_of_its_weights_where_only_the_bag_reads_bytes(
    bag_rows: int, pack_rows: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(14)
    fp32 = Transformer(preset("tiny")).eval()
    model = quantize_int8(copy.deepcopy(fp32).to(dtype))
    kept = copy.deepcopy(model)
    choices = _int8_choices(model, bag_rows, pack_rows)
    assert layout.use_inference_layout(model, reuse=choices) == choices
    layers = layout.int8_linears(model)
    one_byte = sum(m.out_features * m.in_features for m in layers)
    tails = sum(8 * m.in_features for m in layers)  # each packed row's scale and offset
    rest = model_size_bytes(kept) - one_byte  # scales, norms, the position table
    # One byte per weight where only the bag reads bytes, in an fp32 model whose GEMMs oneDNN
    # runs; a layer that int8pack serves, or whose conversions are bf16 (slower from the
    # packed copy) or run on the BLAS (which reads column-major blocks differently), keeps both.
    alone = pack_rows <= bag_rows and packed_alone_serves(dtype)
    assert all((m.weight is None) == alone and m.packed_nbytes > 0 for m in layers)
    assert _resident_bytes(model) == rest + one_byte * (1 if alone else 2) + tails
    if alone:  # tiny's packed tails and position table weigh more than gpt2-124m's (0.26x)
        assert _resident_bytes(model) < 0.33 * model_size_bytes(fp32)
    # The same logits as the model before its layout, given the same kernels.
    for plain, served in zip(layout.int8_linears(kept), layers):
        plain.bag_rows, plain.pack_rows = served.bag_rows, served.pack_rows
    idx = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(_cached_logits(model, idx), _cached_logits(kept, idx))
