"""Post-training int8 for inference: weight-only int8 linears (any device), dynamic int8 (CPU).

Inference only: quantized models must not be trained. A head tied to the token embedding is
quantized with it, as one int8 matrix (`TiedInt8Embedding`): per-output-channel scales of the head
are per-row scales of the table, so the lookup and the product share the bytes and the scales.
At batch 1 that head was more than half of what a decode step read while it stayed fp32.

On the CPU, products of a few rows (batch-1 and small-batch decode) read the int8 weight as it
is, through FBGEMM's 8-bit embedding-bag kernel, instead of converting the whole matrix to the
activation dtype first: a decode step is streaming weights from memory, and the conversion read
1 byte, wrote 4 and read them back for every weight (3-7x slower at one row,
bench/quantized_cpu.json). With bf16 activations PyTorch's int8 weight-only GEMM
(`int8pack_product`) reads the bytes too, as one product for all rows, which the bag, reading
the weight once per row, loses to at a few rows. lmcore.inference_layout measures up to how
many rows each pays.

A layer that serves its few-row products from the bag and none from int8pack, in an fp32
model whose GEMMs oneDNN runs, keeps ONE copy of its weights: the packed one
(`Int8Linear.settle_copies`, called by the layout). Its other products read W^T's columns
from it a block at a time (`float_rows`), and the tied lookup gathers columns of it: a served
int8 model then holds about a quarter of its fp32 bytes, where the int8 weight beside the
packed copy made it half.

fp16 tops out at 65504: a product of the raw int8 values (up to 127 times the weight over its
scale) overflows ~516 x max|w_row| before the true output does, so fp16 products multiply by
weights already scaled (in fp32, then rounded to fp16) instead of scaling afterwards.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmcore.linear import bag_indices, linear, onednn_enabled, shared_weight_ids

INT8_MAX = 127
# The op has no fast fp32 path (5-100x slower), and fp16 would overflow: it sums the raw int8
# values in the activation dtype, and fp16 scales handed to it instead lose precision (a scale
# under 6e-5 is subnormal in fp16).
INT8PACK_DTYPES = (torch.bfloat16,)
# torch 2.13's CPU kernel crashed the process (SIGSEGV) on inner sizes that are not a multiple
# of 8; only multiples of this are ever handed to it.
INT8PACK_IN_MULTIPLE = 32
INT8PACK_SWITCH = "LMCORE_INT8PACK"  # "0": never use torch._weight_int8pack_mm
QUANTIZE_BLOCK_ELEMENTS = 1 << 20  # 4 MiB of fp32 temporaries per block
# A CPU product converts a large weight a block of output rows at a time: this many elements,
# but no fewer rows (narrow blocks made 768 x 3072 up to 1.4x slower), and only weights of more
# than two blocks are split (bench/avx2/quantized_cpu.json, `dequant_blocks`).
DEQUANT_BLOCK_ELEMENTS = 1 << 20
DEQUANT_MIN_BLOCK_ROWS = 512
PACK_BLOCK_ROWS = 256  # the byte bag's packed copy is written this many weight rows at a time
# A layer that keeps its packed copy alone hands the GEMMs of fp32 products W^T's columns as
# they lie there (column-major blocks): transposing them back cost ~0.7 ms per million weights,
# as much as a 17-row product. oneDNN (lmcore.linear's fp32 GEMM where onednn_enabled())
# gave the same bits on either order from 2 rows on, over gpt2-124m's and other shapes, down
# to blocks of 1-7 output rows; the BLAS did not for 1-3 rows or for 7-row blocks, fp16 did
# not at all (torch 2.13, Zen 4). So only fp32 models whose GEMMs oneDNN runs keep the packed
# copy alone (`packed_alone_serves`); other products of such a layer (1 row without the bag,
# a model cast after its layout) get row-major blocks, the same bits at the transposing cost.
# Nor bf16 models: reading the columns costs a byte pass before the conversion, which fp32
# products of 17+ rows paid 0-12% for (gpt2-124m's shapes), but bf16's conversion is
# compute-bound and the pass added in full (+11-20% at 64 rows, +30-45% at 17).


class Int8Linear(nn.Module):
    """y = (x @ W_int8^T) * scale + bias: int8 weights with one scale per output channel.

    Symmetric, round-to-nearest, scale = max|W_row| / 127. The int8 -> activation-dtype cast is
    exact (|q| <= 127 fits bf16/fp16 mantissas), so the only error is the rounding of W; fp16
    products use the weight scaled to fp16 instead (see the module docstring), whose error is
    that of an fp16 copy of W.

    bag_rows: CPU products of up to this many rows take the byte bag (`byte_bag_product`), which
    sums the same int8 values in fp32; 0 (the default) until lmcore.inference_layout measures it.
    pack_rows: CPU products of more rows than that, up to this many, in bf16, take PyTorch's
    int8 weight-only GEMM (`int8pack_product`); 0 until measured.
    packed_only: the layout found that only the byte bag reads the (out, in) int8 weight's
    bytes as they are (`settle_copies`): `weight` is released (None) and every product reads
    the packed copy, which `packed_rows()` keeps alone again after a new weight is loaded.
    """

    bag_rows: int = 0
    pack_rows: int = 0
    packed_only: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Buffers, not Parameters: nothing here is trainable, and .to(dtype) must not touch int8.
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        # Scale and bias in fp32 by default: a bf16 scale would add its own 0.4% rounding.
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        q, scale = quantize_per_channel(w)
        out = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  device=w.device)
        out.weight.copy_(q)
        out.scale.copy_(scale)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out

    def dequantize(self) -> torch.Tensor:
        return self.float_rows(slice(None), self.scale.dtype) * self.scale[:, None]

    def float_rows(
        self, rows: slice, dtype: torch.dtype, any_order: bool = False
    ) -> torch.Tensor:
        """W[rows] (the int8 values q) in `dtype`, row-major: from `weight`, or, where the layer
        keeps its packed copy alone, from W^T's columns there; `any_order`: column-major from
        the packed copy as it lies (see the comment above the class)."""
        weight = self.weight
        if weight is not None:
            return weight[rows].to(dtype)
        cols = self._packed[:, : self.out_features][:, rows]  # q ^ 0x80, one row per channel
        # Flip the sign bits back in a byte pass: converting the uint8 and subtracting 128 ran
        # 2-3x slower on these strided runs (and the subtraction in bf16 slower still).
        q = (cols ^ 0x80).view(torch.int8)
        return q.to(dtype).t() if any_order else _transposed(q).to(dtype)

    def _any_order(self, x: torch.Tensor) -> bool:
        """Whether the GEMM of x is oneDNN's of 2+ rows: the same bits on either weight order."""
        rows = x.numel() // self.in_features
        return rows >= 2 and not torch.is_autocast_enabled("cpu") and packed_alone_serves(x.dtype)

    def int8_weight(self) -> torch.Tensor:
        """The (out, in) int8 weight: `weight`, or rebuilt from the packed copy (a full-size
        transposing copy: for the state dict and other rare readers, never a product)."""
        if self.weight is not None:
            return self.weight
        return _transposed((self._packed[:, : self.out_features] ^ 0x80).view(torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:  # the fast kernels below would read any width
            raise RuntimeError(
                f"Int8Linear({self.in_features} -> {self.out_features}) got an input of shape "
                f"{tuple(x.shape)}: its last dimension must be {self.in_features}"
            )
        rows = x.numel() // self.in_features
        if (
            0 < rows <= max(self.bag_rows, self.pack_rows)
            and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()  # the compiler lowers products its own way
            # Neither kernel has a backward: an input that wants its gradient takes the GEMM.
            and not (x.requires_grad and torch.is_grad_enabled())
        ):
            if rows <= self.bag_rows:
                return byte_bag_product(x, self)
            if x.dtype in INT8PACK_DTYPES and self.in_features % INT8PACK_IN_MULTIPLE == 0:
                return int8pack_product(x, self)  # never fp32; never a size it may crash on
        return self.dequant_product(x)

    def dequant_product(self, x: torch.Tensor) -> torch.Tensor:
        """The product on any device and any rows: the weight converted to x's dtype, a GEMM.

        On the CPU a large weight is converted and multiplied a block of output rows at a time
        (`dequant_blocks`), so the converted copy is a few MiB that stay in cache, not a fresh
        full-size temporary (147 MiB for gpt2-124m's head in fp32) paged in on every call.
        """
        if (
            x.device.type == "cpu"
            and self.out_features > 2 * dequant_block_rows(self.in_features)
            and not torch.compiler.is_compiling()  # the compiler fuses the conversion itself
        ):
            return self.dequant_blocks(x)
        if x.dtype == torch.float16:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return linear(x, self.fp16_weight(), bias)
        # Scale the output, not the weight: one (out,) multiply instead of a full (out, in) one.
        # In fp32, as the byte bag does: a scale rounded to bf16 would add its own 0.4% error,
        # and inductor's CPU rewrite of a bf16 `mm * scale` into its int8 kernel fails to
        # compile (torch 2.13: "AssertionError: <class 'torch._inductor.ir.Pointwise'>").
        compiling = torch.compiler.is_compiling()  # the compiler picks its own order
        weight = self.float_rows(slice(None), x.dtype, not compiling and self._any_order(x))
        y = linear(x, weight, None).float() * self.scale.float()
        y = y + self.bias.float() if self.bias is not None else y
        return y.to(x.dtype)

    def dequant_blocks(self, x: torch.Tensor, block_rows: int | None = None) -> torch.Tensor:
        """`dequant_product`, converting `block_rows` rows of the weight at a time (default
        `dequant_block_rows`), each block's product scaled straight into its columns of the
        fp32 output."""
        step = block_rows or dequant_block_rows(self.in_features)
        flat = x.reshape(-1, self.in_features)
        y = torch.empty(flat.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        scale = self.scale.float()
        any_order = self._any_order(x)
        for start in range(0, self.out_features, step):
            rows = slice(start, start + step)
            if x.dtype == torch.float16:  # scaled first: the raw product would overflow
                y[:, rows] = linear(flat, self.fp16_weight(rows), None)
                continue
            block = linear(flat, self.float_rows(rows, x.dtype, any_order), None)
            torch.mul(block, scale[rows], out=y[:, rows])
        if self.bias is not None:
            y += self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def fp16_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        """These rows of the weight dequantized to fp16, scaled in fp32 and rounded once: what
        fp16 products multiply by, since the unscaled int8 values overflow fp16 sums."""
        return (self.float_rows(rows, torch.float32) * self.scale[rows, None].float()).half()

    def packed_rows(self) -> torch.Tensor:
        """The weight as the byte bag reads it, made on first use and remade when the weight
        changes: one row per input channel (a row of W^T), each the q + 128 bytes followed by
        the row's fp32 scale 1 and offset -128, so that every value reads back exactly as q.
        It costs one more byte per weight beside `weight` (and 8 per input channel), unless
        the layer is `packed_only`: then `weight` is released once the copy is made. An
        inference tensor's in-place change is invisible here: call `drop_packed_rows` after
        one (load_state_dict does)."""
        weight = self.weight
        if weight is None:  # released: the packed copy is the weights
            return self._packed
        key = _storage_key(weight)
        if getattr(self, "_packed_key", None) != key:
            with torch.inference_mode(False):  # an ordinary tensor, whatever mode asks first
                self._packed, self._packed_key = _pack_for_byte_bag(weight), key
        if self.packed_only:
            self.weight = None  # one copy: every product reads the packed one
        return self._packed

    def settle_copies(self, activations: torch.dtype) -> None:
        """Keep the copies of the weights that this layer's products read, once the layout has
        set bag_rows and pack_rows for these activations: the int8 weight alone where no
        product takes the byte bag; the packed copy alone where int8pack (which reads the
        (out, in) int8 weight) serves none and `packed_alone_serves` these activations, on the
        CPU; else both."""
        if not self.bag_rows:
            self.drop_packed_rows()  # timing the bag packed it: one byte per weight
            return
        self.packed_only = (
            packed_alone_serves(activations)
            and self.pack_rows <= self.bag_rows
            and self.scale.device.type == "cpu"
        )
        if not self.packed_only:
            self._restore_weight()
        self.packed_rows()  # made now, not in the first request's step (~2 ms/M weights)

    @property
    def packed_nbytes(self) -> int:
        """Bytes the byte bag's packed copy holds now (0 when none is made); where the layer
        keeps it alone (`weight` None), model_size_bytes counts them as the layer's weights."""
        packed = self.__dict__.get("_packed")
        return 0 if packed is None else packed.nbytes

    def drop_packed_rows(self) -> None:
        """Free the packed copy: a layer whose products never take the byte bag needs none.
        A layer that kept it alone gets its int8 weight back first."""
        self.packed_only = False
        self._restore_weight()
        self.__dict__.pop("_packed", None)
        self.__dict__.pop("_packed_key", None)

    def _restore_weight(self) -> None:
        """`weight` again, rebuilt from the packed copy where it was released."""
        if self.weight is None:
            self.weight = self.int8_weight()
            self._packed_key = _storage_key(self.weight)  # the packed copy holds its values

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # The load copies into the same storage, and an inference tensor (a model loaded under
        # inference_mode) has no version counter, so the packed copy's key cannot see it. A
        # packed_only layer loads into its weight rebuilt, and keeps the new packed copy alone
        # once the bag makes it.
        packed_only = self.packed_only
        self.drop_packed_rows()
        self.packed_only = packed_only
        super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        if self.weight is None:  # released: the state dict holds it all the same, in place
            destination[prefix + "weight"] = self.int8_weight()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Any:
        if self.weight is None:  # the packed copy is the weights: it moves with the layer
            self._packed = fn(self._packed)
            if self._packed.device.type != "cpu":  # the byte bag is CPU-only: the plain weight
                self.drop_packed_rows()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.scale.dtype}")


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """t.t() in fresh row-major storage: .contiguous() of a one-row result keeps strides (1, 1),
    which a GEMM may read as transposed."""
    return torch.empty(t.shape[::-1], dtype=t.dtype, device=t.device).copy_(t.t())


def _storage_key(weight: torch.Tensor) -> tuple[Any, ...]:
    """What `Int8Linear.packed_rows` tells a changed weight by. Inference tensors keep no
    version counter; their storage is the key alone."""
    version = None if weight.is_inference() else weight._version
    return (weight.data_ptr(), version, weight.device)


def packed_alone_serves(activations: torch.dtype) -> bool:
    """A layer serving these activations may keep its packed copy alone: fp32 products whose
    GEMMs oneDNN runs (see the comment above `Int8Linear`)."""
    return activations == torch.float32 and onednn_enabled()


def dequant_block_rows(in_features: int) -> int:
    """Rows of an int8 weight `Int8Linear.dequant_blocks` converts at a time by default."""
    return max(DEQUANT_MIN_BLOCK_ROWS, DEQUANT_BLOCK_ELEMENTS // in_features)


class TiedInt8Embedding(nn.Module):
    """The token lookup of a head tied to its embedding, read from the head's int8 matrix.

    Row i is `head.weight[i] * head.scale[i]`, in fp32 (the model adds it to its position
    embedding in its own dtype). The head owns the tensors, so the state dict, .to() and model
    sizes see them once; this module keeps a plain reference to it, not a submodule.
    """

    def __init__(self, head: Int8Linear) -> None:
        super().__init__()
        self.__dict__["head"] = head  # bypasses nn.Module: not a second registration

    @property
    def weight(self) -> torch.Tensor:
        """The int8 table (the head's weight), for code that asks an embedding for its device;
        where the head keeps its packed copy alone, that copy (W^T's bytes, one row per
        channel): rebuilding the table here would copy it on every `Transformer.device`."""
        head = self.head
        return head.weight if head.weight is not None else head.packed_rows()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self.head
        if head.weight is not None:
            rows = F.embedding(idx, head.weight).float()
        else:  # each token's row of W is a column of the packed copy: gather those
            cols = head.packed_rows().index_select(1, idx.reshape(-1))
            # Row-major, as the lookup was: a norm reduces a strided row in another order.
            q = (cols ^ 0x80).view(torch.int8).t().contiguous()
            rows = q.view(*idx.shape, head.in_features).float()
        return rows * head.scale[idx].float().unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.head.out_features}, {self.head.in_features}, int8, tied to the head"


def _pack_for_byte_bag(weight: torch.Tensor) -> torch.Tensor:
    """`Int8Linear.packed_rows` of an (out, in) int8 weight, written straight into its place.

    q + 128 is q's byte with the sign bit flipped; a block of output rows at a time is read
    and transposed in cache (3.5x faster than one strided pass over gpt2-124m's head, and no
    full-size temporaries: the int16 sum and the concatenation were 3x the packed bytes).
    """
    out_features, in_features = weight.shape
    tail = torch.tensor([1.0, -128.0]).view(torch.uint8)  # each row's fp32 scale and offset
    packed = torch.empty(in_features, out_features + tail.numel(), dtype=torch.uint8,
                         device=weight.device)  # fmt: skip
    as_bytes = weight.view(torch.uint8)
    for start in range(0, out_features, PACK_BLOCK_ROWS):
        stop = min(start + PACK_BLOCK_ROWS, out_features)
        torch.bitwise_xor(as_bytes[start:stop].t(), 0x80, out=packed[:, start:stop])
    packed[:, out_features:] = tail
    return packed


@functools.cache
def byte_bag_supported() -> bool:
    """This torch has FBGEMM's 8-bit row-wise embedding bag (x86 builds) and it reads the packed
    layout that `Int8Linear.packed_rows` writes (checked once, on a 2 x 3 product)."""
    try:
        layer = Int8Linear(2, 3)
        layer.weight.copy_(torch.tensor([[1, -2], [127, -127], [0, 5]], dtype=torch.int8))
        got = byte_bag_product(torch.tensor([[0.5, 2.0]]), layer)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return torch.equal(got, torch.tensor([[-3.5, -190.5, 10.0]]))


def byte_bag_product(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """layer(x) on the CPU for a few rows of x, each row one weighted bag over the rows of the
    packed W^T: reads one byte per weight per row, accumulating in fp32."""
    rows = x.numel() // layer.in_features
    indices, offsets = bag_indices(layer.in_features, rows, x.device)
    y = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        layer.packed_rows(), indices, offsets, False, 0, False, _flat_fp32(x), None, False
    )
    y = y * layer.scale.float()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], layer.out_features)


def _flat_fp32(x: torch.Tensor) -> torch.Tensor:
    """x's values as one contiguous fp32 row: the op reads its weights as dense memory, so a
    strided or expanded x (a view `.float()` keeps as it is) would be read wrongly."""
    return x.float().contiguous().view(-1)


@functools.cache
def _int8pack_runs() -> bool:
    """This torch has the CPU int8 weight-only GEMM and it gives an exact small product."""
    op = getattr(torch, "_weight_int8pack_mm", None)
    if op is None:
        return False
    weight = torch.zeros(3, INT8PACK_IN_MULTIPLE, dtype=torch.int8)
    weight[:, :2] = torch.tensor([[1, -2], [127, -127], [0, 5]], dtype=torch.int8)
    x = torch.zeros(1, INT8PACK_IN_MULTIPLE, dtype=torch.bfloat16)
    x[0, :2] = torch.tensor([1.0, 2.0])
    try:
        got = op(x, weight, torch.ones(3, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError):
        return False
    return torch.equal(got.float(), torch.tensor([[-3.0, -127.0, 10.0]]))


def int8pack_supported(activations: torch.dtype, in_features: int) -> bool:
    """`int8pack_product` may serve int8 linears of this input size with these activations
    (bf16, an inner size it is safe on, not switched off by LMCORE_INT8PACK=0)."""
    return (
        activations in INT8PACK_DTYPES
        and in_features % INT8PACK_IN_MULTIPLE == 0
        and os.environ.get(INT8PACK_SWITCH, "1") != "0"
        and _int8pack_runs()
    )


def int8pack_product(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """layer(x) for bf16 x on the CPU through torch._weight_int8pack_mm: the int8 weight
    read as it is, in one product for all rows. Given unit scales, so the fp32 scale applies
    after, as on every other path."""
    if x.dtype not in INT8PACK_DTYPES:
        raise ValueError(f"int8pack_product takes bf16 activations only, got {x.dtype}")
    if layer.in_features % INT8PACK_IN_MULTIPLE:
        raise ValueError(f"int8pack_product needs in_features a multiple of "
                         f"{INT8PACK_IN_MULTIPLE}, got {layer.in_features}")  # fmt: skip
    flat = x.reshape(-1, layer.in_features).contiguous()  # the kernel takes plain rows only
    ones = torch.ones(layer.out_features, dtype=x.dtype)
    y = torch._weight_int8pack_mm(flat, layer.int8_weight(), ones).float() * layer.scale.float()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], layer.out_features)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 weight and fp32 per-row scale (symmetric, no zero point).

    A block of rows at a time, so the fp32 temporaries stay small: whole-matrix ones were two
    more copies of gpt2-124m's 147 MiB head at the peak of an int8 load.
    """
    lo, hi = torch.aminmax(weight, dim=1)  # max |w| without a full-size abs() temporary
    amax = torch.maximum(-lo.float(), hi.float())
    # An all-zero row gets scale 1 instead of 0 so dequantization never divides by zero.
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    step = max(1, QUANTIZE_BLOCK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        block = weight[rows].float() / scale[rows, None]
        q[rows] = block.round_().clamp_(-INT8_MAX, INT8_MAX)
    return q, scale


def _matches(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _linears_to_quantize(model: nn.Module, skip: Sequence[str]) -> list[str]:
    shared = shared_weight_ids(model)  # a tied head: its weight is also the embedding's
    return [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not _matches(name, skip) and id(m.weight) not in shared
    ]


def _tied_heads(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, str]]:
    """(embedding name, linear name) of each linear whose weight is an embedding's, where
    neither is skipped."""
    tables = {id(m.weight): name for name, m in model.named_modules()
              if isinstance(m, nn.Embedding)}  # fmt: skip
    return [
        (tables[id(m.weight)], name) for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and id(m.weight) in tables
        and not _matches(name, skip) and not _matches(tables[id(m.weight)], skip)
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _quantize_linear(model: nn.Module, name: str, device: torch.device | None = None) -> None:
    linear = model.get_submodule(name)
    _set_submodule(model, name, Int8Linear.from_linear(linear.to(device)))


def _quantize_tied(
    model: nn.Module, table: str, name: str, device: torch.device | None = None
) -> None:
    head = Int8Linear.from_linear(model.get_submodule(name).to(device))
    _set_submodule(model, name, head)
    _set_submodule(model, table, TiedInt8Embedding(head))


@torch.no_grad()
def quantize_int8(model: nn.Module, *, skip: Sequence[str] = ()) -> nn.Module:
    """Replace every nn.Linear (except `skip` names) by Int8Linear, in place; cast the model to
    its serving dtype first (scales stay fp32 either way).

    `skip` matches a full module name or its last parts ("head" matches "head"). A head tied to
    the token embedding becomes one int8 matrix for both (`TiedInt8Embedding` reads it); skipping
    either name keeps both in full precision, since quantizing the head alone would store the
    matrix twice. Other embeddings stay as they are. Returns the model, in eval() mode.
    """
    for name in _linears_to_quantize(model, skip):
        _quantize_linear(model, name)
    for table, name in _tied_heads(model, skip):
        _quantize_tied(model, table, name)
    return model.eval()


def quantize_as_loaded(
    model: nn.Module, *, skip: Sequence[str] = (), device: torch.device | str | None = None
) -> Callable[[str], None]:
    """For a loader that fills `model` one tensor at a time: a callback, given each tensor's
    name (as in the state dict, a tied tensor by its first name) once it is in, that quantizes
    each linear `quantize_int8(model, skip=skip)` would as soon as its last tensor is in.

    Each full-precision weight is released as its linear is quantized, so a CPU load of an
    int8 model never holds the whole full-precision model: the rest of it is allocated but not
    yet written (pages never touched). On a GPU that allocation would be real, so a model for
    a GPU is built on the CPU and each linear moved to `device` just before it is quantized
    there: the device then holds the int8 model plus one full-precision layer at a time (the
    rest of the model follows with `model.to(device)` once loaded).
    """
    first_name = {id(p): n for n, p in model.named_parameters()}  # a tied tensor counts once

    def names(*modules: str) -> set[str]:
        return {first_name[id(p)] for m in modules for p in model.get_submodule(m).parameters()}

    # Names and actions only: a reference to a module here would keep its weight alive.
    linears = _linears_to_quantize(model, skip)
    pending = [names(name) for name in linears]
    device = None if device is None else torch.device(device)
    actions = [functools.partial(_quantize_linear, model, name, device) for name in linears]
    for table, name in _tied_heads(model, skip):
        pending.append(names(name, table))
        actions.append(functools.partial(_quantize_tied, model, table, name, device))
    group_of = {name: i for i, group in enumerate(pending) for name in group}

    @torch.no_grad()
    def loaded(name: str) -> None:
        i = group_of.pop(name, None)
        if i is None:  # not a quantized linear's tensor (a norm, the position table)
            return
        pending[i].discard(name)
        if not pending[i]:
            actions[i]()

    return loaded


def dynamic_int8(model: nn.Module, *, skip: Sequence[str] = ()) -> nn.Module:
    """A CPU copy with PyTorch dynamic int8 linears (int8 weights and int8 activation matmuls).

    Uses torch.ao.quantization.quantize_dynamic: deprecated in favour of torchao (its warning
    announces removal) but still present and working in torch 2.13; the warnings are silenced
    here. The input model is left untouched, and a head tied to an embedding stays in full
    precision (this form has no int8 lookup). Raises RuntimeError where this torch lacks it.
    """
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as exc:  # pragma: no cover - depends on the installed torch
        raise RuntimeError("this torch has no torch.ao.quantization.quantize_dynamic; "
                           "use quantize_int8 instead") from exc
    cpu = copy.deepcopy(model).to("cpu").float().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        # Per-channel scales, like Int8Linear; the default is one coarser scale per tensor.
        names = _linears_to_quantize(cpu, skip)
        for name in names:
            # quantize_dynamic swaps modules by exact type: lmcore's Linear becomes nn.Linear.
            cpu.get_submodule(name).__class__ = nn.Linear
        spec = {name: per_channel_dynamic_qconfig for name in names}
        return quantize_dynamic(cpu, qconfig_spec=spec, dtype=torch.qint8, inplace=True)


def _packed_bytes(module: nn.Module) -> int:
    """Weights that dynamic-quantized modules keep in packed params, and an Int8Linear that
    keeps its packed copy alone keeps there, outside parameters() and buffers()."""
    if isinstance(module, Int8Linear):
        return module.packed_nbytes if module.weight is None else 0
    weight_bias = getattr(module, "_weight_bias", None)
    # The quantized Linear and its packed-params child both expose _weight_bias: count the child.
    if weight_bias is None or any(hasattr(c, "_weight_bias") for c in module.children()):
        return 0
    return sum(_tensor_bytes(t) for t in weight_bias() if t is not None)


def _tensor_bytes(t: torch.Tensor) -> int:
    size = t.numel() * t.element_size()
    if t.is_quantized and t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        # Per-channel quantized tensors carry their scales and zero points inside.
        scales, zeros = t.q_per_channel_scales(), t.q_per_channel_zero_points()
        size += scales.numel() * scales.element_size() + zeros.numel() * zeros.element_size()
    return size


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of parameters + buffers (a tied tensor counted once) + packed int8 weights
    (an Int8Linear's packed copy only where it replaced the weight: beside the weight it is a
    second copy, `Int8Linear.packed_nbytes`)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total + sum(_packed_bytes(m) for m in model.modules())
