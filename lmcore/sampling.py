"""Sampling from logits: temperature, top-k, top-p, then one seeded draw per row.

Pure per-step math over a batch of logits rows and their `SamplingParams`; it must not know
about models, caches or the decode loop (`generate` and the engine build on it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmcore.device import host_to_device
from lmcore.draws import Draws, next_uniforms

# Where the filters select and sort through NumPy: on the CPU torch's topk and sort are 3-30x
# slower. Elsewhere (a GPU) torch's run; tests take that path on the CPU by emptying this set.
NUMPY_FILTER_DEVICES = frozenset({"cpu"})
MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos: bool = True  # finish at the end-of-text token

    def __post_init__(self) -> None:
        # Types first: a wrong one (top_k=2.5) would otherwise fail later, in the sampler, for
        # every request sharing the batch. Bools are not numbers here.
        for name in ("max_new_tokens", "top_k", "seed"):
            value = getattr(self, name)
            if not _is_int(value) and not (name == "seed" and value is None):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not (_is_int(value) or isinstance(value, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not isinstance(self.eos, bool):
            raise ValueError(f"eos must be True or False, got {self.eos!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop must be a string or a sequence of strings, got {self.stop!r}")
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sample_token(
    logits: torch.Tensor, params: SamplingParams, draws: Draws
) -> int:
    """One token id from a (vocab,) logits row: greedy, or temperature + top-k + top-p."""
    return sample_tokens(logits[None], [params], [draws])[0]


def sample_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    draws: Sequence[Draws],
) -> list[int]:
    """One token id per row of (B, vocab) logits, each row with its own params and draws.

    The rows are sampled together, a few ops for the batch instead of a few per row (and on a
    GPU one copy to the host instead of one per row); every op works row by row, so a row gets
    the token it would get alone.
    """
    return sample_token_ids(logits, params, draws).tolist()


def sample_token_ids(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    draws: Sequence[Draws],
) -> torch.Tensor:
    """`sample_tokens` left on the logits' device: (B,) ids, and the host never waits for them.

    Every host value the ops need (temperatures, row indices, ...) reaches a GPU by an
    asynchronous copy, so the engine can queue its next step behind these ops.
    """
    rows = [i for i, p in enumerate(params) if p.temperature != 0.0]
    if len(rows) == len(params):
        row_max = logits.amax(dim=-1)
        sampled = _sample_rows(logits, row_max, list(params), list(draws))
        return flag_non_finite(sampled, row_max, logits.shape[-1])
    row_max, tokens = logits.max(dim=-1)  # the greedy rows' answer
    if rows:
        index = host_to_device(rows, logits.device)
        sampled = _sample_rows(logits.index_select(0, index), row_max.index_select(0, index),
                               [params[i] for i in rows], [draws[i] for i in rows])  # fmt: skip
        tokens.index_copy_(0, index, sampled)
    return flag_non_finite(tokens, row_max, logits.shape[-1])


def flag_non_finite(tokens: torch.Tensor, row_max: torch.Tensor, vocab: int) -> torch.Tensor:
    """tokens (B,), but `vocab` (one past the last id) for each row whose logits hold NaN or
    +inf, or are -inf throughout, which their max (B,) shows: no real token, so the caller fails
    that request alone (`NonFiniteLogitsError`) instead of generating from garbage (greedy would
    take id 0 from an all -inf row; sampling finds nothing to draw). A step input must clamp
    such ids (`clamp_ids`)."""
    return torch.where(torch.isfinite(row_max), tokens, vocab)


def clamp_ids(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """tokens with flagged ids pulled into the vocabulary, for a step queued before the host
    has seen them: an embedding lookup out of range would abort the whole device."""
    return tokens.clamp(max=vocab_size - 1)


def _sample_rows(
    logits: torch.Tensor, row_max: torch.Tensor, params: list[SamplingParams], draws: list[Draws]
) -> torch.Tensor:
    """Temperature, then top-k, then top-p, then one draw per row: (S, vocab) -> (S,) ids.

    row_max (S,) is each row's largest logit.
    """
    device, vocab = logits.device, logits.shape[-1]
    ks = [min(p.top_k, vocab) for p in params]
    # Every row's inputs in one host array, so one copy to a GPU rather than one per input:
    # temperature, the index of the k-th largest value (-1: top-k off), top-p (inf: off), draw.
    inputs = [[p.temperature, k - 1, p.top_p if p.top_p < 1.0 else float("inf"), u]
              for p, k, u in zip(params, ks, next_uniforms(draws).tolist())]  # fmt: skip
    row_inputs = host_to_device(inputs, device, torch.float64)
    temperature = row_inputs[:, 0:1].float()
    x = logits.float()
    if min(p.temperature for p in params) < OVERFLOW_SAFE_TEMPERATURE:
        # Rare, and known on the host: only so small a temperature takes a sane logit past
        # float32's range, so the usual step runs no extra kernels. One under that range would
        # round to 0; its smallest normal number is as greedy.
        temperature = temperature.clamp_(min=torch.finfo(torch.float32).tiny)
        x = x.sub(_overflow_shift(row_max, temperature))
    x = x / temperature
    if any(ks):
        x = x.masked_fill(x < _kth_largest(x, ks, row_inputs[:, 1:2]), float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        x = x.masked_fill(~nucleus(x, row_inputs[:, 2].float()), float("-inf"))
    # Inverse-transform sampling: one uniform draw per row, where torch.multinomial draws one
    # exponential per vocabulary entry (10% of a 32-request engine step on CPU). In float64,
    # with x in (0, total], the first cdf >= x never lands on a zero-probability token.
    cdf = torch.cumsum(torch.softmax(x, dim=-1, dtype=torch.float64), dim=-1)
    return torch.searchsorted(cdf, ((1.0 - row_inputs[:, 3]) * cdf[:, -1])[:, None])[:, 0]


# Temperatures from here up divide a logit of up to 3e32 without overflow; smaller ones get
# `_overflow_shift`.
OVERFLOW_SAFE_TEMPERATURE = 1e-6


def _overflow_shift(row_max: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """(S, 1): what to subtract from each row's logits before dividing by its temperature.

    A tiny temperature (1e-38 and below) divides the top logit past float32's range, or itself
    rounds to 0. Such rows subtract their max, so the top token divides 0 and the others fall
    to -inf or near it: one-hot, the limit as the temperature goes to 0 (greedy; tied top
    tokens share the mass). Every other row subtracts 0, which leaves its logits, and so its
    seeded tokens, exactly as they were. row_max: (S,); temperature: (S, 1) float32, > 0.
    """
    top = row_max.float()[:, None]
    overflows = torch.isfinite(top) & ~torch.isfinite(top / temperature)
    return torch.where(overflows, top, 0.0)


def _kth_largest(x: torch.Tensor, ks: list[int], kth_index: torch.Tensor) -> torch.Tensor:
    """(S, 1): each row's k-th largest value, -inf where k is 0 (top-k off).

    On the CPU through NumPy's selection, one k at a time: its cost does not grow with k,
    where torch.topk's does (32 rows of 8,192: 0.6 ms at k=50, 3.1 at 1,000, 13 at 8,192,
    against ~0.2 ms). kth_index is (S, 1) k-1 on x's device, -1 where k is 0.
    """
    if x.device.type in NUMPY_FILTER_DEVICES:
        values = np.full((len(ks), 1), -np.inf, dtype=np.float32)
        row_values = x.detach().numpy()
        vocab = row_values.shape[-1]
        for k in set(ks) - {0}:
            rows = [i for i, row_k in enumerate(ks) if row_k == k]
            chosen = row_values if len(rows) == len(ks) else row_values[rows]
            values[rows, 0] = np.partition(chosen, vocab - k, axis=-1)[:, vocab - k]
        return torch.from_numpy(values)
    top = torch.topk(x, max(ks), dim=-1).values  # (S, max k), descending
    return top.gather(1, kth_index.clamp(min=0).long()).masked_fill_(kth_index < 0, float("-inf"))


def nucleus(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p: True for each row's smallest set of most probable tokens whose mass reaches top_p.

    A token is kept while the tokens ranked above it hold less than top_p (so at least one is
    kept), ranking by probability and, among equal ones, by lower id: the set a stable sort
    would give. Only the sorted probabilities are needed, not the order, so the set is a
    threshold (the smallest kept probability) plus the first few ids tied at it. x: (S, vocab)
    float32 logits, top_p: (S,).
    """
    probs = torch.softmax(x, dim=-1)
    ranked = _sorted_descending(probs)
    # A cumsum of non-negative numbers never decreases, so a search counts the positions whose
    # mass so far is below top_p; each of them, and the one after it, is kept.
    mass = torch.cumsum(ranked, dim=-1)
    kept = (torch.searchsorted(mass, top_p[:, None].contiguous()) + 1).clamp_(max=x.shape[-1])
    threshold = ranked.gather(1, kept - 1)  # (S, 1): the smallest kept probability
    over = probs > threshold
    tied = probs == threshold
    # Tied tokens to keep, lowest ids first. In int32: counting in int64, torch's default for
    # bools, took 17x longer on a 2-core CPU (32 rows of 8,192).
    room = (kept - torch.count_nonzero(over, dim=-1)[:, None]).to(torch.int32)
    return over | (tied & (torch.cumsum(tied, dim=-1, dtype=torch.int32) <= room))


def _sorted_descending(values: torch.Tensor) -> torch.Tensor:
    """Each row's values, largest first. On the CPU through NumPy: torch.sort also orders the
    indices, 30x slower for 32 rows of 8,192 (14 ms, the cost of a whole engine step)."""
    if values.device.type in NUMPY_FILTER_DEVICES:
        return torch.from_numpy(np.sort(-values.detach().numpy(), axis=-1)).neg_()
    return torch.sort(values, dim=-1, descending=True).values
