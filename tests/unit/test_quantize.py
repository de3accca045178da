"""Int8 quantization: exact dequant math, what gets replaced, size, accuracy and generation."""

from __future__ import annotations

import copy
import platform
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lmcore.config import preset
from lmcore.cache import KVCache
from lmcore.generate import SamplingParams, decode_step, generate_ids, prefill
from lmcore.linear import Linear
from lmcore.model import Transformer
from lmcore.quant_report import quantization_report
from lmcore.quantize import (
    PACK_BLOCK_ROWS,
    Int8Linear,
    TiedInt8Embedding,
    byte_bag_product,
    byte_bag_supported,
    dynamic_int8,
    int8pack_product,
    int8pack_supported,
    model_size_bytes,
    packed_alone_serves,
    quantize_as_loaded,
    quantize_int8,
    quantize_per_channel,
)

pytestmark = pytest.mark.unit

BYTE_BAG_OP = "quantized::embedding_bag_byte_rowwise_offsets"
PERIOD = 23  # the trained model learns a repeating sequence of 23 distinct tokens


def pattern_tokens(n: int) -> torch.Tensor:
    return (torch.arange(n) * 7 % PERIOD + 3).long()


@pytest.fixture(scope="module")
def trained() -> Transformer:
    """A tiny model trained until it continues the pattern: its logits are confident, not noise."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", block_size=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = pattern_tokens(4 * PERIOD + 65)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        chunk = torch.stack([data[s : s + 65] for s in starts])
        _, loss = model(chunk[:, :-1], chunk[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def test_per_channel_rounding_error_is_at_most_half_a_step() -> None:
    w = torch.randn(16, 32) * torch.linspace(0.01, 3.0, 16)[:, None]
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())
    assert bool((q[5] == 0).all())


def test_int8_linear_equals_matmul_with_its_dequantized_weight() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(32, 48, bias=True)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(3, 5, 32)
    want = F.linear(x, q.dequantize(), q.bias)
    torch.testing.assert_close(q(x), want, atol=1e-5, rtol=1e-5)
    # And it is close to the original layer: weight error is at most half a step per element.
    torch.testing.assert_close(q(x), linear(x), atol=0.05, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_product_converted_a_block_of_rows_at_a_time_agrees_with_the_whole_conversion(
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(1)
    layer = Int8Linear.from_linear(nn.Linear(32, 50, bias=True)).to(dtype)
    x = torch.randn(2, 3, 32).to(dtype)
    whole = F.linear(x.float(), layer.dequantize().float(), layer.bias.float()).to(dtype)
    for block in (1, 7, 50, 1000):  # one row, a ragged last block, one block
        got = layer.dequant_blocks(x, block)
        assert got.dtype == dtype and got.shape == (2, 3, 50)
        tol = 1e-5 if dtype == torch.float32 else 0.01
        torch.testing.assert_close(got, whole, rtol=tol, atol=tol)


# (bag_rows, pack_rows): one row takes the bag and 16 would take int8pack, or both dequantize.
@pytest.mark.parametrize("kernels", [(0, 0), (1, 16)], ids=["dequant", "bag_or_int8pack"])
@pytest.mark.parametrize("out_features", [64, 1100], ids=["whole", "blocks"])
def test_fp16_products_stay_finite_and_match_fp16_dequantized_weights(
    monkeypatch: pytest.MonkeyPatch, out_features: int, kernels: tuple[int, int]
) -> None:
    in_features = 768
    monkeypatch.setattr("lmcore.quantize.DEQUANT_BLOCK_ELEMENTS", 256 * in_features)
    monkeypatch.setattr("lmcore.quantize.DEQUANT_MIN_BLOCK_ROWS", 256)  # 1100 rows: 5 blocks
    torch.manual_seed(8)
    linear = nn.Linear(in_features, out_features, bias=True)
    nn.init.normal_(linear.weight, std=0.02)
    layer = Int8Linear.from_linear(linear).half()
    layer.bag_rows, layer.pack_rows = kernels
    # Inputs of 3 along the signs of row 0: its output (~37) is far inside fp16's range, but
    # the raw int8 sum (output / scale, ~3 x 40 x 768) is not.
    x = (torch.sign(layer.weight[0].float()) * 3).repeat(16, 1).half()
    want = F.linear(x.float(), layer.dequantize().half().float(), layer.bias.float()).half()
    for rows in (1, 16):
        got = layer(x[:rows])
        assert got.dtype == torch.float16 and bool(torch.isfinite(got).all()), rows
        torch.testing.assert_close(got, want[:rows], rtol=2e-3, atol=2e-3)


def test_a_large_cpu_weight_is_never_converted_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lmcore.quantize.DEQUANT_BLOCK_ELEMENTS", 10 * 64)  # 10 rows of 64
    monkeypatch.setattr("lmcore.quantize.DEQUANT_MIN_BLOCK_ROWS", 4)
    torch.manual_seed(2)

    def converted_rows(out_features: int, in_features: int) -> list[int]:
        """The row counts of each int8 -> float conversion during one product."""
        layer = Int8Linear.from_linear(nn.Linear(in_features, out_features))
        x = torch.randn(17, in_features)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            got = layer(x)
        want = F.linear(x, layer.dequantize(), layer.bias)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        rows = []
        for event in p.key_averages(group_by_input_shape=True):
            if event.key == "aten::_to_copy" and event.input_shapes[0][1:] == [in_features]:
                rows += [event.input_shapes[0][0]] * event.count
        return sorted(rows)

    assert converted_rows(45, 64) == [5, 10, 10, 10, 10]  # more than two blocks
    assert converted_rows(20, 64) == [20]  # two blocks: converted whole
    assert converted_rows(9, 320) == [1, 4, 4]  # 2 rows of 320 make a block: the least is 4


def test_quantize_int8_replaces_every_linear_and_makes_the_tied_pair_one_int8_matrix() -> None:
    model = quantize_int8(Transformer(preset("tiny")))
    assert [m for m in model.modules() if type(m) in (nn.Linear, Linear)] == []
    assert isinstance(model.blocks[0].attn.qkv, Int8Linear)
    assert isinstance(model.head, Int8Linear) and isinstance(model.tok_emb, TiedInt8Embedding)
    assert model.tok_emb.weight is model.head.weight and model.head.weight.dtype == torch.int8
    # One copy: the head owns the tensors; no float table is left behind.
    assert {k for k in model.state_dict() if k.startswith(("head", "tok_emb"))} == {
        "head.weight", "head.scale"}
    assert not model.training


def test_the_int8_lookup_reads_the_heads_dequantized_rows() -> None:
    torch.manual_seed(7)
    model = Transformer(preset("tiny"))
    float_rows = model.tok_emb.weight.detach().clone()
    quantize_int8(model)
    idx = torch.tensor([[0, 5, 511], [5, 5, 2]])
    with torch.no_grad():
        rows = model.tok_emb(idx)
    torch.testing.assert_close(rows, model.head.dequantize()[idx], rtol=0, atol=0)
    assert float((rows - float_rows[idx]).abs().max()) <= float(model.head.scale.max()) / 2


def test_the_tied_pair_stays_one_matrix_when_the_model_moves_or_casts() -> None:
    model = quantize_int8(Transformer(preset("tiny"))).to(torch.bfloat16)
    assert model.tok_emb.weight is model.head.weight and model.head.weight.dtype == torch.int8
    logits, _ = model(pattern_tokens(16)[None])
    assert logits.dtype == torch.bfloat16
    copied = copy.deepcopy(model)
    assert copied.tok_emb.weight is copied.head.weight
    assert copied.head.weight is not model.head.weight
    moved = copied.to("meta")  # a device move makes new tensors: the lookup follows the head's
    assert moved.tok_emb.weight is moved.head.weight and moved.tok_emb.weight.is_meta


def test_a_compiled_int8_decode_step_has_no_graph_breaks(trained: Transformer) -> None:
    q = quantize_int8(copy.deepcopy(trained))
    cache = KVCache.for_model(q, 2, 32)
    assert cache.k.dtype == torch.float32  # the model's dtype, not the int8 table's
    with torch.inference_mode():
        prefill(q, [[1, 2, 3], [4, 5]], cache)
        explanation = torch._dynamo.explain(decode_step)(
            q, torch.tensor([[6], [7]]), torch.tensor([[3], [2]]), cache
        )
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("skip", ["head", "tok_emb"])
def test_skipping_either_half_keeps_the_tied_pair_in_full_precision(skip: str) -> None:
    model = quantize_int8(Transformer(preset("tiny")), skip=(skip,))
    assert type(model.head) is Linear and model.head.weight is model.tok_emb.weight
    assert isinstance(model.blocks[0].mlp.up, Int8Linear)


def test_an_untied_head_is_quantized_unless_skipped() -> None:
    cfg = preset("tiny", tie_embeddings=False)
    model = quantize_int8(Transformer(cfg))
    assert isinstance(model.head, Int8Linear) and type(model.tok_emb) is nn.Embedding
    assert type(quantize_int8(Transformer(cfg), skip=("head",)).head) is Linear


def test_quantizing_as_loaded_swaps_each_linear_once_its_tensors_are_in() -> None:
    model = Transformer(preset("tiny"))
    reference = quantize_int8(copy.deepcopy(model))
    fp32_up = weakref.ref(model.blocks[0].mlp.up.weight)
    loaded = quantize_as_loaded(model)
    # A loader reports tensors one at a time; block 0's come in, block 1's have not yet.
    for name in [n for n in model.state_dict() if n.startswith("blocks.0.")]:
        loaded(name)
    assert isinstance(model.blocks[0].mlp.up, Int8Linear)
    assert fp32_up() is None  # its full-precision weight is released already
    assert type(model.blocks[1].mlp.up) is Linear and type(model.head) is Linear
    loaded("tok_emb.weight")  # the tied pair: the table's tensor is the head's
    assert isinstance(model.head, Int8Linear) and isinstance(model.tok_emb, TiedInt8Embedding)
    for name in model.state_dict():
        loaded(name)  # the rest; names already reported or not quantized are ignored
    got, want = model.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_model_size_counts_tied_weights_once() -> None:
    model = Transformer(preset("tiny"))
    assert model_size_bytes(model) == 4 * model.num_params(non_embedding=False)


def test_int8_stores_one_byte_per_weight_plus_the_scales_and_the_float_rest() -> None:
    model = Transformer(preset("tiny"))
    fp32_bytes = model_size_bytes(model)
    q = quantize_int8(copy.deepcopy(model))
    int8 = [m for m in q.modules() if isinstance(m, Int8Linear)]
    weights = sum(m.weight.numel() for m in int8)
    scales = sum(m.out_features for m in int8)
    floats = sum(p.numel() for p in q.parameters())  # norms and the position table
    assert model_size_bytes(q) == weights + 4 * scales + 4 * floats
    # The head's matrix counts once: 147k weights at 4 bytes become ~1 byte each (~0.31x).
    assert weights + floats == model.num_params(non_embedding=False)
    assert 0.28 < model_size_bytes(q) / fp32_bytes < 0.34


def test_int8_logits_are_close_to_fp32(trained: Transformer) -> None:
    idx = pattern_tokens(64)[None]
    q = quantize_int8(copy.deepcopy(trained))
    with torch.no_grad():
        fp, i8 = trained(idx)[0], q(idx)[0]
    # Stated tolerance: within 2% of the logit range (measured: ~0.3%).
    span = float(fp.max() - fp.min())
    assert float((i8 - fp).abs().max()) < 0.02 * span
    assert float((i8.argmax(-1) == fp.argmax(-1)).float().mean()) >= 0.95


def test_greedy_generation_with_int8_and_kv_cache_matches_fp32(trained: Transformer) -> None:
    q = quantize_int8(copy.deepcopy(trained))
    prompts = [pattern_tokens(10).tolist(), pattern_tokens(17)[3:].tolist()]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, eos=False)
    fp = generate_ids(trained, prompts, params)
    cached = generate_ids(q, prompts, params)
    uncached = generate_ids(q, prompts, params, use_cache=False)
    assert [g.token_ids for g in cached] == [g.token_ids for g in uncached]
    agree = sum(a == b for f, c in zip(fp, cached) for a, b in zip(f.token_ids, c.token_ids))
    assert agree / (2 * 24) >= 0.9
    assert all(len(g.token_ids) == 24 for g in cached)


needs_byte_bag = pytest.mark.skipif(
    not byte_bag_supported(), reason="this torch build has no FBGEMM 8-bit embedding bag"
)
needs_packed_alone = pytest.mark.skipif(
    not byte_bag_supported() or not packed_alone_serves(torch.float32),
    reason="no byte bag, or fp32 GEMMs run on the BLAS here: no layer keeps its packed copy alone",
)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="FBGEMM, the byte bag's kernel, ships in x86 builds of torch")
def test_x86_builds_have_a_working_byte_bag() -> None:
    assert byte_bag_supported()  # else the tests below skip and int8 decode takes the GEMM path


def test_the_byte_bags_packed_rows_are_the_shifted_transpose_and_each_rows_scale_and_offset(
) -> None:
    torch.manual_seed(6)
    layer = Int8Linear(40, PACK_BLOCK_ROWS * 2 + 37)  # blocks of rows, the last one ragged
    layer.weight.copy_(torch.randint(-128, 128, layer.weight.shape, dtype=torch.int8))
    packed = layer.packed_rows()
    assert packed.dtype == torch.uint8 and packed.shape == (40, layer.out_features + 8)
    want = (layer.weight.t().to(torch.int16) + 128).to(torch.uint8)
    assert torch.equal(packed[:, : layer.out_features], want)
    tails = packed[:, layer.out_features :].contiguous().view(torch.float32)
    assert torch.equal(tails, torch.tensor([[1.0, -128.0]]).expand(40, 2))


@needs_byte_bag
def test_the_byte_bag_reads_every_int8_value_exactly() -> None:
    layer = Int8Linear(255, 3, bias=True)
    q = torch.arange(-127, 128, dtype=torch.int8)  # every value an int8 weight can hold
    layer.weight.copy_(torch.stack([q, q.flip(0), torch.zeros_like(q)]))
    layer.scale.copy_(torch.tensor([0.5, 2.0, 1.0]))
    layer.bias.copy_(torch.tensor([1.0, -1.0, 3.0]))
    one_hot = torch.eye(255)  # row i picks input channel i: the product is q[:, i] * scale + bias
    got = torch.cat([byte_bag_product(row[None], layer) for row in one_hot])
    torch.testing.assert_close(got, layer.dequantize().t() + layer.bias, rtol=0, atol=0)


@needs_byte_bag
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_products_of_up_to_bag_rows_take_the_byte_bag_and_agree(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    layer = Int8Linear.from_linear(Linear(48, 40)).to(dtype)
    layer.bag_rows = 3
    for rows in range(1, 6):
        x = torch.randn(rows, 48).to(dtype)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            got = layer(x)
        used_bag = BYTE_BAG_OP in {e.key for e in prof.key_averages()}
        assert used_bag == (rows <= 3), rows
        # fp32: the same sums in another order. bf16: the bag rounds once, the GEMM path twice.
        tol = 1e-5 if dtype == torch.float32 else 0.01
        torch.testing.assert_close(got, layer.dequant_product(x), rtol=tol, atol=tol)
        assert got.dtype == dtype and got.shape == (rows, 40)


@needs_byte_bag
def test_the_byte_bag_reads_strided_and_expanded_inputs_by_their_values() -> None:
    torch.manual_seed(4)
    layer = Int8Linear.from_linear(Linear(64, 96))
    layer.bag_rows = 4
    inputs = {
        "strided": torch.randn(2, 128)[:, ::2],  # a view with stride 2, which .float() keeps
        "one strided row": torch.randn(1, 128)[:, ::2],
        "expanded": torch.full((1, 1), 0.5).expand(1, 64),  # stride 0: one float in storage
    }
    with torch.inference_mode():
        for name, x in inputs.items():
            torch.testing.assert_close(
                byte_bag_product(x, layer), layer.dequant_product(x.contiguous()),
                rtol=1e-5, atol=1e-5, msg=name,
            )


@pytest.mark.parametrize("bag_rows", [0, 4], ids=["gemm", "byte_bag"])
@pytest.mark.parametrize("width", [63, 65])
def test_int8_linear_refuses_an_input_of_the_wrong_width_on_every_path(
    bag_rows: int, width: int
) -> None:
    layer = Int8Linear.from_linear(Linear(64, 96))
    layer.bag_rows = bag_rows
    with torch.inference_mode(), pytest.raises(RuntimeError, match="last dimension must be 64"):
        layer(torch.randn(1, width))


@pytest.mark.parametrize("tokens", [3, 6], ids=["byte_bag_rows", "gemm_rows"])
def test_int8_gradients_reach_the_layers_below_at_every_row_count(tokens: int) -> None:
    torch.manual_seed(5)
    model = quantize_int8(Transformer(preset("tiny")))
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.bag_rows = module.pack_rows = 4  # fewer rows than that took the byte bag
    _, loss = model(pattern_tokens(tokens)[None], pattern_tokens(tokens + 1)[None, 1:])
    loss.backward()
    grad = model.pos_emb.weight.grad
    assert grad is not None and grad[:tokens].abs().sum() > 0


def _laid_out_alone(layer: Int8Linear, bag_rows: int) -> Int8Linear:
    """An untouched copy of `layer` taking the same kernels; `layer` itself is laid out as the
    layout lays out a layer that only the byte bag reads as bytes: its packed copy alone."""
    kept = copy.deepcopy(layer)
    layer.bag_rows = kept.bag_rows = bag_rows
    released = weakref.ref(layer.weight)
    layer.settle_copies(torch.float32)  # laid out for fp32; a later cast serves others from it
    assert layer.weight is None and layer.packed_only and layer.packed_nbytes > 0
    assert released() is None  # the int8 weight's storage is freed, not kept elsewhere
    return kept


@needs_packed_alone
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("out_features, in_features", [(40, 96), (1100, 96), (97, 33)],
                         ids=["whole", "blocks", "odd"])  # fmt: skip
def test_a_layer_keeping_only_its_packed_copy_gives_the_same_bits_on_every_path(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, out_features: int, in_features: int
) -> None:
    monkeypatch.setattr("lmcore.quantize.DEQUANT_BLOCK_ELEMENTS", 256 * in_features)
    monkeypatch.setattr("lmcore.quantize.DEQUANT_MIN_BLOCK_ROWS", 256)  # 1100 rows: 5 blocks
    torch.manual_seed(9)
    linear = nn.Linear(in_features, out_features, bias=True)
    nn.init.normal_(linear.weight, std=0.02)
    layer = Int8Linear.from_linear(linear).to(dtype)
    # One row takes the bag; fp32 products of more rows read column-major blocks through
    # oneDNN, bf16 and fp16 ones (a model cast after its layout) row-major blocks.
    kept = _laid_out_alone(layer, bag_rows=1)
    # The bag, then the conversion, whole or in blocks, plain or (fp16) scaled.
    shapes = [(rows, in_features) for rows in [*range(1, 41), 64, 256]] + [(2, 9, in_features)]
    for shape in shapes:
        x = torch.randn(shape).to(dtype)
        with torch.no_grad():
            got, want = layer(x), kept(x)
        assert got.dtype == dtype and torch.equal(got, want), shape
        assert layer.weight is None, shape  # no product brings the weight back
    for rows in (1, 2, 17):  # one row without the bag: row-major blocks
        x = torch.randn(rows, in_features).to(dtype)
        assert torch.equal(layer.dequant_product(x), kept.dequant_product(x)), rows
        for block in (7, 256, 2000):  # ragged blocks, one block
            got, want = layer.dequant_blocks(x, block), kept.dequant_blocks(x, block)
            assert torch.equal(got, want), (rows, block)
    assert torch.equal(layer.dequantize(), kept.dequantize())
    assert torch.equal(layer.fp16_weight(slice(3, 30)), kept.fp16_weight(slice(3, 30)))
    assert torch.equal(layer.int8_weight(), kept.weight)


@needs_packed_alone
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_model_keeping_only_packed_copies_gives_the_same_logits_lookups_and_tokens(
    trained: Transformer, dtype: torch.dtype
) -> None:
    kept = quantize_int8(copy.deepcopy(trained).to(dtype))
    served = copy.deepcopy(kept)
    for plain, alone in zip(kept.modules(), served.modules()):
        if isinstance(alone, Int8Linear):
            plain.bag_rows = alone.bag_rows = 1
            alone.settle_copies(torch.float32)  # laid out in fp32, then cast (as above)
    assert served.head.weight is None and served.device.type == "cpu"
    idx = torch.stack([pattern_tokens(40), pattern_tokens(43)[3:]])
    with torch.no_grad():
        rows = served.tok_emb(idx)  # the tied lookup, gathered from the head's packed copy
        assert rows.is_contiguous() and torch.equal(rows, kept.tok_emb(idx))
        assert torch.equal(served(idx)[0], kept(idx)[0])  # 80 rows: the conversion
    prompts = [pattern_tokens(10).tolist(), pattern_tokens(17)[3:].tolist()]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, eos=False)
    want = generate_ids(kept, prompts, params)
    got = generate_ids(served, prompts, params)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert all(m.weight is None for m in served.modules() if isinstance(m, Int8Linear))


@needs_packed_alone
def test_a_layer_keeping_only_its_packed_copy_still_saves_loads_and_moves_its_weight() -> None:
    torch.manual_seed(10)
    layer, other = (Int8Linear.from_linear(Linear(32, 24, bias=True)) for _ in range(2))
    want = layer.state_dict()
    kept = _laid_out_alone(layer, bag_rows=3)
    got = layer.state_dict()  # the weight rebuilt, in its place among the keys
    assert list(got) == list(want) == ["weight", "scale", "bias"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    # A new weight loads into the weight rebuilt; the bag packs it and keeps that copy alone.
    layer.load_state_dict(other.state_dict())
    other.bag_rows = 3
    for rows in (5, 1):  # the conversion from the loaded weight, then the bag
        x = torch.randn(rows, 32)
        with torch.no_grad():
            assert torch.equal(layer(x), other(x)), rows
    assert layer.weight is None and layer.packed_only
    # Dropping the packed copy gives the weight back; so does a move off the CPU.
    layer.drop_packed_rows()
    assert torch.equal(layer.weight, other.weight) and layer.packed_nbytes == 0
    kept.settle_copies(torch.float32)
    moved = copy.deepcopy(kept).to("meta")
    assert moved.weight.is_meta and moved.weight.shape == (24, 32) and moved.packed_nbytes == 0
    cast = kept.to(torch.bfloat16)  # on the CPU the packed copy stays the only one
    assert cast.weight is None and cast.scale.dtype == torch.bfloat16


INT8PACK_OP = "aten::_weight_int8pack_mm"
needs_int8pack = pytest.mark.skipif(
    not int8pack_supported(torch.bfloat16, 64), reason="this torch has no CPU int8 weight GEMM"
)


def test_int8pack_is_offered_for_bf16_activations_on_safe_inner_sizes_unless_switched_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Never fp32 (no fast path) or fp16 (its raw int8 sums overflow), never an inner size the
    # op crashed this torch on.
    assert not int8pack_supported(torch.float32, 64) and not int8pack_supported(torch.float16, 64)
    assert not int8pack_supported(torch.bfloat16, 72) and not int8pack_supported(torch.float16, 33)
    monkeypatch.setenv("LMCORE_INT8PACK", "0")
    assert not int8pack_supported(torch.bfloat16, 64)
    # Whatever pack_rows says, such a layer never hands the op its input.
    layer = Int8Linear.from_linear(Linear(40, 8)).to(torch.bfloat16)
    layer.pack_rows = 4
    x = torch.randn(3, 40).bfloat16()
    torch.testing.assert_close(layer(x), layer.dequant_product(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        int8pack_product(x, layer)


@needs_byte_bag
@needs_int8pack
def test_bf16_products_beyond_bag_rows_take_int8pack_up_to_pack_rows_and_agree() -> None:
    torch.manual_seed(5)
    dtype = torch.bfloat16
    layer = Int8Linear.from_linear(Linear(64, 40, bias=True)).to(dtype)
    layer.bag_rows, layer.pack_rows = 1, 4
    for rows in range(1, 7):
        x = torch.randn(rows, 64).to(dtype)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            got = layer(x)
        ops = {e.key for e in prof.key_averages()}
        assert (BYTE_BAG_OP in ops, INT8PACK_OP in ops) == (rows == 1, 1 < rows <= 4), rows
        torch.testing.assert_close(got, layer.dequant_product(x), rtol=0.01, atol=0.01)
        assert got.dtype == dtype and got.shape == (rows, 40)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        layer.half()(torch.randn(3, 64).half())  # nor fp16 nor fp32, whatever pack_rows
        layer.float()(torch.randn(3, 64))
    assert INT8PACK_OP not in {e.key for e in prof.key_averages()}


@needs_int8pack
def test_int8pack_reads_the_int8_values_exactly_before_the_scale() -> None:
    layer = Int8Linear(64, 3, bias=True)
    layer.weight.copy_(torch.randint(-127, 128, (3, 64), dtype=torch.int8))
    layer.scale.copy_(torch.tensor([0.5, 2.0, 1.0]))
    layer.bias.copy_(torch.tensor([1.0, -1.0, 3.0]))
    x = torch.eye(64, dtype=torch.bfloat16)  # row i picks input channel i
    got = int8pack_product(x, layer)
    torch.testing.assert_close(got, (layer.dequantize().t() + layer.bias).bfloat16(),
                               rtol=0, atol=0)  # fmt: skip


@needs_byte_bag
def test_the_byte_bag_follows_a_new_weight() -> None:
    torch.manual_seed(4)
    layer, other = (Int8Linear.from_linear(Linear(32, 24)) for _ in range(2))
    layer.bag_rows = 1
    x = torch.randn(1, 32)
    with torch.no_grad():
        layer(x)  # packs the first weight
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other.dequant_product(x), rtol=1e-5, atol=1e-5)


@needs_byte_bag
def test_the_byte_bag_follows_a_new_weight_loaded_under_inference_mode() -> None:
    torch.manual_seed(4)
    with torch.inference_mode():  # inference tensors: no version counter to see the load by
        layer, other = (Int8Linear.from_linear(Linear(32, 24)) for _ in range(2))
        layer.bag_rows = 1
        x = torch.randn(1, 32)
        layer(x)  # packs the first weight
        layer.load_state_dict(other.state_dict())
        assert layer.weight.is_inference()
        torch.testing.assert_close(layer(x), other.dequant_product(x), rtol=1e-5, atol=1e-5)


@needs_byte_bag
def test_greedy_generation_is_unchanged_when_int8_layers_take_the_byte_bag(
    trained: Transformer,
) -> None:
    q = quantize_int8(copy.deepcopy(trained))
    prompts = [pattern_tokens(10).tolist(), pattern_tokens(17)[3:].tolist()]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, eos=False)
    dequant = generate_ids(q, prompts, params)
    for layer in q.modules():
        if isinstance(layer, Int8Linear):
            layer.bag_rows = 2  # both decode rows and the one-row prefill of a single prompt
    bagged = generate_ids(q, prompts, params)
    alone = generate_ids(q, prompts[:1], params)
    assert [g.token_ids for g in bagged] == [g.token_ids for g in dequant]
    assert alone[0].token_ids == dequant[0].token_ids


@needs_int8pack
def test_greedy_bf16_generation_is_unchanged_when_int8_layers_take_int8pack(
    trained: Transformer,
) -> None:
    q = quantize_int8(copy.deepcopy(trained).to(torch.bfloat16))
    prompts = [pattern_tokens(10).tolist(), pattern_tokens(17)[3:].tolist(),
               pattern_tokens(12)[5:].tolist()]  # fmt: skip
    params = SamplingParams(max_new_tokens=24, temperature=0.0, eos=False)
    dequant = generate_ids(q, prompts, params)
    for layer in q.modules():
        if isinstance(layer, Int8Linear):
            layer.bag_rows, layer.pack_rows = 1, 16  # 2- and 3-row decode steps take int8pack
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        packed = generate_ids(q, prompts, params)
    assert INT8PACK_OP in {e.key for e in prof.key_averages()}
    assert [g.token_ids for g in packed] == [g.token_ids for g in dequant]


@pytest.mark.parametrize("copies", ["weight", "packed alone"])
def test_a_compiled_bf16_int8_layer_gives_the_eager_result(copies: str) -> None:
    torch.manual_seed(6)
    layer = Int8Linear.from_linear(Linear(64, 96))
    if copies == "packed alone":
        if not byte_bag_supported() or not packed_alone_serves(torch.float32):
            pytest.skip("no layer keeps its packed copy alone here")
        _laid_out_alone(layer, bag_rows=3)
    x = torch.randn(2, 1, 64, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), layer(x), rtol=0.01, atol=0.01)


def test_int8_runs_a_bf16_model_in_bf16() -> None:
    model = quantize_int8(Transformer(preset("tiny")).to(torch.bfloat16))
    logits, _ = model(pattern_tokens(16)[None])
    assert logits.dtype == torch.bfloat16
    assert model.blocks[0].mlp.up.weight.dtype == torch.int8


def test_dynamic_int8_is_close_to_fp32_and_leaves_the_input_model_alone(
    trained: Transformer,
) -> None:
    dyn = dynamic_int8(trained)
    assert type(trained.blocks[0].attn.qkv) is Linear
    assert type(dyn.blocks[0].attn.qkv) is not nn.Linear
    idx = pattern_tokens(64)[None]
    with torch.no_grad():
        fp, d8 = trained(idx)[0], dyn(idx)[0]
    assert float((d8 - fp).abs().max()) < 0.02 * float(fp.max() - fp.min())
    assert model_size_bytes(dyn) < 0.5 * model_size_bytes(trained)


def test_quantization_report_gives_sizes_and_loss_delta_without_changing_the_model(
    trained: Transformer,
) -> None:
    trained.train()
    report = quantization_report(trained, pattern_tokens(400), 64, windows=4,
                                 include_dynamic=True)
    assert trained.training and type(trained.blocks[0].attn.qkv) is Linear
    assert report["base_bytes"] == model_size_bytes(trained)
    assert report["int8_bytes"] == model_size_bytes(quantize_int8(copy.deepcopy(trained)))
    assert 0.28 < report["int8_size_ratio"] < 0.34
    assert report["int8_val_loss_delta"] == pytest.approx(
        report["int8_val_loss"] - report["base_val_loss"]
    )
    assert abs(report["int8_val_loss_delta"]) < 0.05
    assert abs(report["dynamic_int8_val_loss_delta"]) < 0.05
    assert all(isinstance(v, float) for v in report.values())


def test_quantization_report_refuses_too_few_tokens(trained: Transformer) -> None:
    with pytest.raises(ValueError, match="block_size"):
        quantization_report(trained, pattern_tokens(30), 64)


@pytest.mark.gpu
def test_int8_bf16_model_generates_on_cuda(trained: Transformer) -> None:
    fp = copy.deepcopy(trained).cuda().to(torch.bfloat16)
    q = quantize_int8(copy.deepcopy(fp))
    assert q.blocks[0].attn.qkv.weight.device.type == "cuda"
    idx = pattern_tokens(64)[None].cuda()
    with torch.no_grad():
        a, b = fp(idx)[0].float(), q(idx)[0].float()
    assert float((a - b).abs().max()) < 0.05 * float(a.max() - a.min())
    params = SamplingParams(max_new_tokens=16, temperature=0.0, eos=False)
    out = generate_ids(q, [pattern_tokens(10).tolist()], params)
    assert len(out[0].token_ids) == 16
