"""Static KV cache: keys and values preallocated per layer, written at explicit positions.

Fixed shapes let the decode step compile once; it must not grow, shrink or reallocate per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lmcore.model import Transformer


class KVCache(nn.Module):
    """Keys/values of every layer: (n_layer, batch, n_head, max_len, head_dim) each.

    Every row keeps its own positions, so ragged prompts and engine slots share one cache.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        # Buffers, not parameters: they follow .to() but are not saved with the weights.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer(
            "positions", torch.arange(max_len, device=device), persistent=False
        )
        # Row ids made once, not per layer per step.
        self.register_buffer("row_ids", torch.arange(batch_size, device=device), persistent=False)

    @classmethod
    def for_model(
        cls,
        model: Transformer,
        batch_size: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        cfg = model.config
        max_len = cfg.block_size if max_len is None else max_len
        if not 1 <= max_len <= cfg.block_size:
            raise ValueError(f"max_len must be in 1..{cfg.block_size}, got {max_len}")
        weight = model.pos_emb.weight  # the model's dtype (the token table may be int8)
        return cls(
            cfg.n_layer,
            batch_size,
            cfg.n_head,
            max_len,
            cfg.head_dim,
            dtype=dtype or weight.dtype,
            device=weight.device,
        )

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def update(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        input_pos: torch.Tensor,
        rows: slice | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at input_pos (B, T); return this layer's keys and values.

        With `rows` (a slice of B cache rows) input row i lives in cache row rows.start + i, and
        the keys and values returned are views of those rows: a batch over part of the cache
        never copies it.
        """
        batch, _, seq, _ = k.shape
        k_layer, v_layer = self.k[layer], self.v[layer]
        if rows is not None:
            k_layer, v_layer = k_layer[rows], v_layer[rows]
            if k_layer.shape[0] != batch:
                raise ValueError(f"rows {rows} hold {k_layer.shape[0]} cache rows, not {batch}")
        row_idx = self.row_ids[:batch, None].expand(batch, seq)
        # Advanced indices around a slice put the indexed dims first: (B, T, H, D).
        k_layer[row_idx, :, input_pos] = k.transpose(1, 2).to(k_layer.dtype)
        v_layer[row_idx, :, input_pos] = v.transpose(1, 2).to(v_layer.dtype)
        return k_layer, v_layer

    def attention_mask(self, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """(B, 1, T, kv_len) bool: a query at position p sees cache positions <= p.

        kv_len (default max_len) may cut the mask to the filled prefix of the cache when every
        input position is below it; attention then reads only that prefix.
        """
        positions = self.positions if kv_len is None else self.positions[:kv_len]
        return (positions[None, None, :] <= input_pos[:, :, None]).unsqueeze(1)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
