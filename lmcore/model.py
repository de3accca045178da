"""Decoder-only Transformer: learned positions, pre-norm RMSNorm blocks, SDPA attention.

One class per idea, the whole model on a screen or two; it must not know about serving or training.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from lmcore.cache import KVCache
from lmcore.config import ModelConfig
from lmcore.linear import Linear


# Cached (masked) attention on a GPU: the backend SDPA picks by default on an H200 in bf16 gave
# different logits run to run, so seeded sampling drifted apart after ~100 tokens; these two
# repeat bit for bit (scripts/gpu_determinism.py). Flash takes no mask, so it is not lost here.
REPRODUCIBLE_MASKED_SDPA = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Where that holds: a set, so a CPU test can run the GPU's path through torch.compile.
PINNED_MASKED_SDPA_DEVICES = frozenset({"cuda"})


class _SkipInit(TorchFunctionMode):
    """torch.nn.init's functions do nothing while active: for weights a file is about to fill."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]  # what the init function would return
        return func(*args, **(kwargs or {}))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16/fp16 activations do not lose the mean square; one fused op
        # rather than five matters in a decode step, where each op handles one row.
        x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return x32.type_as(x) * self.weight


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.qkv = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj.residual_scale = True  # type: ignore[attr-defined]

    def forward(
        self,
        x: torch.Tensor,
        input_pos: torch.Tensor | None,
        cache: KVCache | None,
        rows: slice | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (B, T, C) -> (B, nh, T, hd)
        q = q.view(batch, seq, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_head, self.head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if cache is None:
            # No mask tensor: is_causal lets SDPA pick the flash kernel on CUDA.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            assert input_pos is not None
            keys, values = cache.update(self.layer, k, v, input_pos, rows)
            if mask is None:
                mask = cache.attention_mask(input_pos)  # (B, 1, T, max_len)
            # A mask cut to the cache's filled prefix (kv_len) means only that prefix is read.
            keys, values = keys[:, :, : mask.shape[-1]], values[:, :, : mask.shape[-1]]
            if keys.dtype != q.dtype:
                keys, values = keys.to(q.dtype), values.to(q.dtype)
            pinned = q.device.type in PINNED_MASKED_SDPA_DEVICES
            with sdpa_kernel(REPRODUCIBLE_MASKED_SDPA) if pinned else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                   dropout_p=dropout)  # fmt: skip
        y = y.transpose(1, 2).reshape(batch, seq, width)
        return self.proj(y)


class MLP(nn.Module):
    """SwiGLU (default) or the GPT-2 GELU MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.mlp_hidden
        self.up = Linear(config.n_embd, hidden, bias=config.bias)
        if self.swiglu:
            self.gate = Linear(config.n_embd, hidden, bias=config.bias)
        self.down = Linear(hidden, config.n_embd, bias=config.bias)
        self.down.residual_scale = True  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, layer)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        input_pos: torch.Tensor | None,
        cache: KVCache | None,
        rows: slice | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), input_pos, cache, rows, mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.head = Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)

    @classmethod
    def uninitialized(
        cls, config: ModelConfig, *, device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Transformer:
        """A model whose weights are allocated on `device` but never set, for a checkpoint to fill.

        No random init that the file replaces (~3 s of gpt2-124m's load on one core) and no
        draw from the global RNG. Not built on the meta device: initializing meta tensors goes
        through torch's reference ops, whose first use imports the compiler (~1 s).
        """
        with torch.device(device), _SkipInit():
            model = cls(config)
        return model.to(dtype) if dtype is not None else model

    def tie_weights(self) -> None:
        """With config.tie_embeddings, the head holds the token embedding's Parameter itself
        (again after to_empty(), which gives each module a tensor of its own)."""
        if self.config.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 init; residual projections scaled by 1/sqrt(2 * n_layer) so depth keeps variance.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scale", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        rows: slice | None = None,
        kv_len: int | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, padded_vocab); loss when targets (B, T) are given.

        Without a cache positions are 0..T-1. With one, input_pos (B, T) holds each token's
        position in its own row; see KVCache.update for `rows`. kv_len (> every position in
        input_pos) lets attention read only the cache's first kv_len positions instead of all
        max_len; leave it None for fixed shapes (a compiled step). logits_at (B,) asks for one
        position's logits per row, (B, 1, padded_vocab): a prefill needs only each prompt's last,
        and the output head over every position would cost T times as much.
        """
        if logits_at is not None and targets is not None:
            raise ValueError("logits_at and targets are exclusive: the loss needs every position")
        batch, seq = idx.shape
        if cache is None:
            if seq > self.config.block_size:
                raise ValueError(
                    f"sequence length {seq} exceeds block_size {self.config.block_size}"
                )
            pos = torch.arange(seq, device=idx.device)
        elif input_pos is None:
            raise ValueError("input_pos is required with a cache")
        else:
            pos = input_pos
        positions = self.pos_emb(pos)
        # In the model's dtype: an int8 token table (lmcore.quantize) looks rows up in fp32.
        x = self.tok_emb(idx).to(positions.dtype) + positions
        # One (B, 1, T, max_len) mask shared by every layer rather than rebuilt per layer.
        mask = None if cache is None else cache.attention_mask(input_pos, kv_len)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, input_pos, cache, rows, mask)
        if logits_at is not None:
            x = x[torch.arange(batch, device=x.device), logits_at][:, None]  # (B, 1, C)
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters counted once (tied head shares the token embedding)."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.pos_emb.weight.numel() + self.tok_emb.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.head.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12·L·d·T (PaLM appendix B).

        N counts the matmul weights including the output head (a real matmul here).
        """
        cfg = self.config
        seq_len = cfg.block_size if seq_len is None else seq_len
        matmul_params = self.num_params(non_embedding=True) + self.head.weight.numel()
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_embd * seq_len

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device
