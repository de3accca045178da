"""Sampling and batched generation over ragged prompts with a static KV cache.

Each request owns its seeded stream of draws (`lmcore.draws`) and its stop rules; this module
must not know about queues, HTTP or threads (the engine and the services build on it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch

from lmcore.cache import KVCache
from lmcore.draws import Draws, next_uniforms

if TYPE_CHECKING:
    from lmcore.model import Transformer

FinishReason = Literal["length", "stop", "eos", "cancelled"]
# Where the filters select and sort through NumPy: on the CPU torch's topk and sort are 3-30x
# slower. Elsewhere (a GPU) torch's run; tests take that path on the CPU by emptying this set.
NUMPY_FILTER_DEVICES = frozenset({"cpu"})
Truncate = Literal["error", "left"]
MAX_STOP_STRINGS = 4


class ContextLengthError(ValueError):
    """The prompt plus max_new_tokens does not fit the model's context window."""


class NonFiniteLogitsError(ArithmeticError):
    """The model's logits for a request held NaN or infinity, so no token could be chosen."""


class TextCodec(Protocol):
    """What generation needs from a tokenizer. One that also has `vocab_size` (how many ids it
    decodes) is never handed an id at or past it (`sampling_vocab`)."""

    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class StreamDecoder(Protocol):
    def feed(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


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


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int = 0


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


def host_to_device(
    values: Sequence[int] | Sequence[float] | Sequence[bool] | Sequence[Sequence[float]],
    device: torch.device,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """A small host list as a tensor on `device`, without waiting for work queued on a GPU.

    torch.tensor(..., device="cuda") copies from pageable memory and waits for the stream;
    from pinned memory the copy is queued like a kernel (the host allocator keeps the buffer
    until the copy has run).
    """
    on_gpu = device.type == "cuda"
    # Lists only: torch.tensor refuses to pin a NumPy array ("Can't pin tensor constructed
    # from numpy").
    tensor = torch.tensor(values, dtype=dtype, pin_memory=on_gpu)
    return tensor.to(device, non_blocking=True) if on_gpu else tensor


class HostCopy:
    """A device tensor's copy to the host, started now; `tolist()` waits for the copy alone.

    On a GPU the copy goes into pinned memory behind the work queued so far, and an event marks
    its end, so work queued after it (the next decode step) keeps the device busy meanwhile.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        self._host = tensor
        if tensor.device.type == "cuda":
            self._host = tensor.to("cpu", non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


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


def stop_prefix_start(text: str, end: int, stop: str) -> int:
    """Where the longest tail of text[:end] that could begin `stop` starts (end if none).

    Only the places where stop's first character occurs are tried: comparing every tail length
    cost ~70 us a token for four stop strings of 200 characters, per request and step.
    """
    i = text.find(stop[0], max(end - len(stop) + 1, 0), end)
    while i >= 0:
        if stop.startswith(text[i:end]):
            return i
        i = text.find(stop[0], i + 1, end)
    return end


class SequenceState:
    """One request's progress: generated ids, the text safe to stream, and when to finish."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        codec: TextCodec | None = None,
        eos_id: int | None = None,
    ) -> None:
        if params.stop and codec is None:
            raise ValueError("stop strings need a tokenizer")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.codec = codec
        self.eos_id = eos_id if eos_id is not None else (codec.eos_id if codec else None)
        self.draws = Draws(params.seed)
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        # Tokenizers with a stream decoder make decoding linear; others re-decode every step.
        make_decoder = getattr(codec, "stream_decoder", None)
        self._decoder: StreamDecoder | None = make_decoder() if make_decoder else None
        self._text = ""  # decoded so far, stop strings cut off once finished
        self._streamed = 0  # characters of _text already handed out

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self._text

    def add_token(self, token_id: int) -> str:
        """Record a sampled token; return the new text that is final and safe to stream."""
        assert not self.finished, "add_token after finish"
        if self.params.eos and token_id == self.eos_id:
            self.finish_reason = "eos"
            return self._flush()
        self.token_ids.append(token_id)
        if self.codec is not None:
            searched = self._decode(token_id)
            if self._cut_at_stop(searched):
                self.finish_reason = "stop"
                return self._flush()
        if len(self.token_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
            return self._flush()
        return self._flush(final=False)

    def cancel(self) -> str:
        self.finish_reason = "cancelled"
        return self._flush()

    def _decode(self, token_id: int) -> int:
        """Add the token's text; return where the text changed, from where stops are searched."""
        if self._decoder is not None:
            changed = len(self._text)
            self._text += self._decoder.feed(token_id)
            return changed
        assert self.codec is not None
        previous, self._text = self._text, self.codec.decode(self.token_ids)
        # Decoded again from all ids, the text does not just grow: a trailing U+FFFD becomes the
        # character its next bytes complete, and a stop string may begin in that character.
        return _first_difference(previous, self._text)

    def result(self) -> Generation:
        assert self.finish_reason is not None
        prompt_tokens = len(self.prompt_ids)
        return Generation(self._text, list(self.token_ids), self.finish_reason, prompt_tokens)

    def _cut_at_stop(self, searched: int) -> bool:
        """Cut at the first stop string; only text near the new characters is searched."""
        hits = [
            i
            for i in (self._text.find(s, max(0, searched - len(s) + 1)) for s in self.params.stop)
            if i >= 0
        ]
        if not hits:
            return False
        self._text = self._text[: min(hits)]
        return True

    def _flush(self, final: bool = True) -> str:
        if final and self._decoder is not None and self.finish_reason != "stop":
            # The flush turns a dangling partial character into U+FFFD, which may complete a
            # stop string: cut there too (a cancelled request stays cancelled).
            searched = len(self._text)
            self._text += self._decoder.flush()
            if self._cut_at_stop(searched) and self.finish_reason != "cancelled":
                self.finish_reason = "stop"
        end = len(self._text)
        if not final:
            # Hold back a half-decoded UTF-8 character and anything that may start a stop string.
            end = len(self._text.rstrip("\ufffd"))
            for stop in self.params.stop:
                end = stop_prefix_start(self._text, end, stop)
        end = max(end, self._streamed)
        delta = self._text[self._streamed : end]
        self._streamed = end
        return delta


def _first_difference(old: str, new: str) -> int:
    """The first index where `new` differs from `old` (len(old) when `new` only extends it)."""
    if new.startswith(old):
        return len(old)
    return next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), len(new))


def check_prompt_ids(prompt_ids: Sequence[int], vocab_size: int) -> None:
    """ValueError naming the first id outside [0, vocab_size): the embedding table has padding
    rows past vocab_size, and an id beyond the table is an IndexError deep in the model."""
    bad = next((i for i in prompt_ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")


def check_truncate(truncate: object) -> None:
    """ValueError naming `truncate` unless it is one of the two policies (a typo such as
    "right" would otherwise act as "error", whose message then suggests the value meant)."""
    if truncate not in ("error", "left"):
        raise ValueError(f"truncate must be 'error' or 'left', got {truncate!r}")


def fit_prompt(
    prompt_ids: Sequence[int], params: SamplingParams, block_size: int, truncate: Truncate
) -> list[int]:
    """The prompt that fits the window with room for max_new_tokens, or ContextLengthError."""
    check_truncate(truncate)
    room = block_size - params.max_new_tokens
    if room < 1:
        raise ContextLengthError(
            f"max_new_tokens ({params.max_new_tokens}) must be below the context window "
            f"({block_size} tokens)"
        )
    if len(prompt_ids) <= room:
        return list(prompt_ids)
    if truncate == "left":
        return list(prompt_ids[-room:])
    raise ContextLengthError(
        f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
        f"the context window ({block_size} tokens); shorten it or use truncate='left'"
    )


def decode_step(
    model: Transformer,
    tokens: torch.Tensor,
    input_pos: torch.Tensor,
    cache: KVCache,
    rows: slice | None = None,
    kv_len: int | None = None,
) -> torch.Tensor:
    """One decode step: tokens (B, 1) at input_pos (B, 1) -> next-token logits (B, V).

    Kept free of Python branching on data so torch.compile captures it in one graph. Without
    `rows` it covers every cache row (fixed shapes, for CUDA graphs); with `rows` (a slice)
    only that range of rows. kv_len (eager only) bounds the cache positions attention reads.
    """
    logits, _ = model(tokens, input_pos=input_pos, cache=cache, rows=rows, kv_len=kv_len)
    return logits[:, -1, : model.config.vocab_size]


def prefill(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cache: KVCache,
    rows: slice | None = None,
) -> torch.Tensor:
    """Write right-padded ragged prompts into the cache; return each row's last logits (B, V)."""
    device = model.device
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    idx = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        idx[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    input_pos = torch.arange(width, device=device).expand(len(prompts), width)
    last = torch.tensor(lengths, device=device) - 1
    logits, _ = model(idx.to(device), input_pos=input_pos, cache=cache, rows=rows, kv_len=width,
                      logits_at=last)  # fmt: skip
    return logits[:, 0, : model.config.vocab_size]


def sampling_vocab(model: Transformer, codec: TextCodec | None) -> int:
    """How many ids sampling may pick: the model's vocabulary, cut to the tokenizer's when that
    is smaller (a model may have more ids than its tokenizer, which cannot decode the rest).
    Sampling from logits[:, :n] costs nothing more, where masking the rest would."""
    vocab = model.config.vocab_size
    codec_vocab = getattr(codec, "vocab_size", None)
    return vocab if codec_vocab is None else min(vocab, codec_vocab)


def _as_list(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return list(params)


@torch.inference_mode()
def generate_ids(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    *,
    codec: TextCodec | None = None,
    eos_id: int | None = None,
    truncate: Truncate = "error",
    use_cache: bool = True,
    step_fn: Callable[..., torch.Tensor] = decode_step,
    on_token: Callable[[int, int, str], None] | None = None,
) -> list[Generation]:
    """Generate for a batch of token-id prompts (ragged allowed); one Generation per prompt.

    use_cache=False recomputes the whole prefix each step (the reference the cache must match).
    on_token(row, token_id, text_delta) is called for every sampled token.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("each prompt needs at least one token (use the eos token to start)")
    for prompt in prompts:
        check_prompt_ids(prompt, model.config.vocab_size)
    plist = _as_list(params, len(prompts))
    block = model.config.block_size
    fitted = [fit_prompt(p, sp, block, truncate) for p, sp in zip(prompts, plist)]
    device = model.device
    states = [
        SequenceState(p, sp, codec=codec, eos_id=eos_id)
        for p, sp in zip(fitted, plist)
    ]
    if use_cache:
        max_len = max(len(p) + sp.max_new_tokens for p, sp in zip(fitted, plist))
        cache = KVCache.for_model(model, len(fitted), max_len)
        logits = prefill(model, fitted, cache)
        step_pos = torch.tensor([[len(p)] for p in fitted], device=device)  # (B, 1)
        last_pos = cache.max_len - 1
        front = max(len(p) for p in fitted)  # the highest position the next step writes
    else:
        logits = _recompute_last_logits(model, states)
    # Only ids the codec can decode are sampled; one at or past vocab flags non-finite logits.
    vocab = sampling_vocab(model, codec)
    all_greedy = all(sp.temperature == 0.0 for sp in plist)
    # Greedy cached decoding on a GPU runs one step ahead: the next step is queued before this
    # step's tokens reach the host, so the GPU works while Python handles them. When every row
    # finishes on these tokens, the queued step is simply unused.
    ahead = all_greedy and use_cache and device.type == "cuda"
    # The eager step reads only the filled part of the cache; a compiled one keeps fixed shapes
    # and replays CUDA graphs, so each call's logits are dead once the next is queued.
    eager = step_fn is decode_step
    mark_steps = device.type == "cuda" and not eager
    queued: torch.Tensor | None = None  # the step already running ahead

    def next_logits(step_tokens: torch.Tensor) -> torch.Tensor:
        nonlocal step_pos, front
        if mark_steps:
            torch.compiler.cudagraph_mark_step_begin()
        bound = {"kv_len": front + 1} if eager else {}
        out = step_fn(model, step_tokens, step_pos, cache, **bound)
        # Finished rows keep stepping (fixed shapes); the clamp keeps them inside the cache.
        step_pos = (step_pos + 1).clamp_(max=last_pos)
        front = min(front + 1, last_pos)
        return out

    while True:
        logits = logits[:, :vocab]  # a view
        if all_greedy:
            # One argmax and one device-to-host copy for the batch rather than one per row.
            # The host gets the ids with non-finite rows flagged; the next step, the argmax.
            row_max, ids = logits.max(dim=-1)
            flagged = flag_non_finite(ids, row_max, vocab)
            step_tokens = ids[:, None]  # (B, 1)
            if ahead:
                copy = HostCopy(flagged)
                queued = next_logits(step_tokens)
                tokens = copy.tolist()  # waits for the copy only, not for the queued step
            else:
                tokens = flagged.tolist()
        else:
            # Finished rows keep stepping (fixed shapes) on token 0 and draw nothing.
            live = [row for row, s in enumerate(states) if not s.finished]
            tokens = [0] * len(states)
            picked = sample_tokens(logits[live], [states[r].params for r in live],
                                   [states[r].draws for r in live])  # fmt: skip
            for row, token in zip(live, picked):
                tokens[row] = token
            step_tokens = torch.tensor(tokens, device=device)[:, None]
        for row, state in enumerate(states):
            if state.finished:
                continue
            if tokens[row] >= vocab:
                raise NonFiniteLogitsError(
                    f"prompt {row}: the model's logits were NaN or infinite at generated token "
                    f"{len(state.token_ids)}")
            delta = state.add_token(tokens[row])
            if on_token is not None:
                on_token(row, tokens[row], delta)
        if all(s.finished for s in states):
            break
        if queued is not None:
            logits, queued = queued, None
        elif use_cache:
            logits = next_logits(step_tokens)
        else:
            logits = _recompute_last_logits(model, states)
    return [s.result() for s in states]


def _recompute_last_logits(model: Transformer, states: list[SequenceState]) -> torch.Tensor:
    """(B, vocab): each live row's next-token logits from its whole sequence, without a cache.

    Rows of one length run as one batch (no padding, so a row's logits are what it gets alone)
    and the head projects only each row's last position (`logits_at`). A finished row's logits
    are never read: it gets zeros and costs nothing.
    """
    vocab = model.config.vocab_size
    by_length: dict[int, list[int]] = {}
    for row, state in enumerate(states):
        if not state.finished:
            by_length.setdefault(len(state.prompt_ids) + len(state.token_ids), []).append(row)
    out: torch.Tensor | None = None
    for length, rows in by_length.items():
        idx = torch.tensor([states[r].prompt_ids + states[r].token_ids for r in rows],
                           dtype=torch.long, device=model.device)  # fmt: skip
        last = torch.full((len(rows),), length - 1, dtype=torch.long, device=model.device)
        logits = model(idx, logits_at=last)[0][:, 0, :vocab]
        if out is None:
            out = logits.new_zeros((len(states), vocab))
        out[rows] = logits
    if out is None:  # every row finished: nothing reads these
        out = torch.zeros((len(states), vocab), device=model.device)
    return out


def generate(
    model: Transformer,
    tokenizer: TextCodec,
    prompts: Sequence[str],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    *,
    truncate: Truncate = "error",
    use_cache: bool = True,
) -> list[Generation]:
    """Text in, text out: an empty prompt starts from the end-of-text token."""
    ids = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]
    return generate_ids(
        model, ids, params, codec=tokenizer, truncate=truncate, use_cache=use_cache
    )
