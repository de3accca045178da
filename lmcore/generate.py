"""Batched generation over ragged prompts with a static KV cache: prefill, decode, stop rules.

Each request owns its seeded stream of draws (`lmcore.draws`) and its stop rules; sampling from
logits is `lmcore.sampling`. This module must not know about queues, HTTP or threads (the engine
and the services build on it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from lmcore.cache import KVCache
from lmcore.device import tolist_after_queueing
from lmcore.draws import Draws

# SamplingParams is imported from here by the README's quick start and the services: it stays
# part of this module's public API, next to generate_ids, which takes it.
from lmcore.sampling import SamplingParams, flag_non_finite, sample_tokens

if TYPE_CHECKING:
    from lmcore.model import Transformer

FinishReason = Literal["length", "stop", "eos", "cancelled"]
Truncate = Literal["error", "left"]


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


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int = 0


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
                tokens, queued = tolist_after_queueing(flagged, lambda: next_logits(step_tokens))
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
