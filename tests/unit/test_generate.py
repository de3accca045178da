"""Generation: the static cache matches full recompute, ragged batches, sampling, stops."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lmcore.cache import KVCache
from lmcore.draws import Draws
from lmcore.generate import (
    ContextLengthError,
    NonFiniteLogitsError,
    SamplingParams,
    SequenceState,
    decode_step,
    generate,
    generate_ids,
    prefill,
    stop_prefix_start,
)
from lmcore import generate as generate_module
from lmcore import model as model_module
from lmcore import sampling as sampling_module
from lmcore.sampling import _kth_largest, nucleus, sample_token, sample_tokens
from lmcore.model import Transformer
from lmcore.tokenizer import IncrementalDecoder
from tests.helpers.models import context_sensitive_model

pytestmark = pytest.mark.unit

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, eos=False)
RAGGED = [[5, 6, 7, 8, 9, 10, 11], [42], [100, 3, 77, 12]]


class ByteCodec:
    """Bytes as token ids (0..255); 256 is end-of-text. Enough to test text handling."""

    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


@pytest.fixture(scope="module")
def model() -> Transformer:
    return context_sensitive_model(0, vocab_size=300)


def _full_recompute_logits(model: Transformer, seq: list[int]) -> torch.Tensor:
    logits, _ = model(torch.tensor([seq]))
    return logits[0, -1, : model.config.vocab_size]


def test_cached_decode_matches_full_recompute_for_one_prompt(model: Transformer) -> None:
    cached = generate_ids(model, [RAGGED[0]], GREEDY)[0]
    uncached = generate_ids(model, [RAGGED[0]], GREEDY, use_cache=False)[0]
    assert cached.token_ids == uncached.token_ids
    # Logits along the way agree too, step by step.
    cache = KVCache.for_model(model, 1, 64)
    with torch.inference_mode():
        logits = prefill(model, [RAGGED[0]], cache)
        seq = list(RAGGED[0])
        for step, token in enumerate(cached.token_ids[:8]):
            torch.testing.assert_close(logits[0], _full_recompute_logits(model, seq))
            seq.append(token)
            pos = torch.tensor([[len(seq) - 1]])
            logits = decode_step(model, torch.tensor([[token]]), pos, cache)


def test_reading_only_the_filled_prefix_of_the_cache_gives_the_same_logits(
    model: Transformer,
) -> None:
    prompts = [RAGGED[0], RAGGED[2]]
    whole, prefix = KVCache.for_model(model, 2, 64), KVCache.for_model(model, 2, 64)
    with torch.inference_mode():
        a, b = prefill(model, prompts, whole), prefill(model, prompts, prefix)
        pos = torch.tensor([[len(p)] for p in prompts])
        for _ in range(6):
            tokens = a.argmax(-1, keepdim=True)
            a = decode_step(model, tokens, pos, whole)
            b = decode_step(model, tokens, pos, prefix, kv_len=int(pos.max()) + 1)
            torch.testing.assert_close(b, a)
            pos = pos + 1


def test_cached_decode_matches_full_recompute_for_a_ragged_batch(model: Transformer) -> None:
    cached = generate_ids(model, RAGGED, GREEDY)
    uncached = generate_ids(model, RAGGED, GREEDY, use_cache=False)
    assert [g.token_ids for g in cached] == [g.token_ids for g in uncached]


def test_the_no_cache_reference_gives_each_row_of_a_ragged_batch_its_logits_alone(
    model: Transformer,
) -> None:
    # Two rows of one length (run as one batch), two of others; only the last position's
    # logits are projected. Each row's must be the full forward's last row for it alone, to
    # fp32 rounding (a one-row head product may take another kernel than a T-row one).
    prompts = [RAGGED[0], [9, 8, 7, 6, 5, 4, 3], RAGGED[1], RAGGED[2]]
    states = [SequenceState(p, GREEDY) for p in prompts]
    with torch.inference_mode():
        got = generate_module._recompute_last_logits(model, states)
        assert got.shape == (len(prompts), model.config.vocab_size)
        for row, prompt in enumerate(prompts):
            torch.testing.assert_close(got[row], _full_recompute_logits(model, prompt))
        states[1].add_token(5)
        states[1].finish_reason = "length"  # a finished row's logits are never read
        again = generate_module._recompute_last_logits(model, states)
    torch.testing.assert_close(again[[0, 2, 3]], got[[0, 2, 3]])
    assert not again[1].any()


def test_the_no_cache_reference_generates_for_each_ragged_row_what_it_does_alone(
    model: Transformer,
) -> None:
    # Rows finish at different steps and two share a length; ids must match each row alone.
    prompts = [RAGGED[0], [9, 8, 7, 6, 5, 4, 3], RAGGED[1], RAGGED[2]]
    params = [SamplingParams(max_new_tokens=n, temperature=0.0, eos=False)
              for n in (24, 9, 17, 4)]  # fmt: skip
    batch = generate_ids(model, prompts, params, use_cache=False)
    alone = [generate_ids(model, [p], sp, use_cache=False)[0] for p, sp in zip(prompts, params)]
    cached = generate_ids(model, prompts, params)
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert [g.token_ids for g in batch] == [g.token_ids for g in cached]
    assert [len(g.token_ids) for g in batch] == [24, 9, 17, 4]


def test_each_ragged_row_generates_what_its_prompt_generates_alone(model: Transformer) -> None:
    batch = generate_ids(model, RAGGED, GREEDY)
    alone = [generate_ids(model, [p], GREEDY)[0] for p in RAGGED]
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert all(len(g.token_ids) == GREEDY.max_new_tokens for g in batch)
    assert all(g.finish_reason == "length" for g in batch)
    assert all(len(set(g.token_ids)) > 3 for g in batch), "outputs must depend on context"


def test_a_long_prompt_that_finishes_early_beside_a_short_one_that_runs_on_stays_in_the_cache(
    model: Transformer,
) -> None:
    # Finished rows keep stepping (fixed shapes): the 20-token prompt done after 2 tokens must
    # not step past the cache, sized for it at 22, while the 1-token prompt runs to 20.
    prompts = [list(range(1, 21)), [5]]
    params = [SamplingParams(max_new_tokens=n, temperature=0.0, eos=False) for n in (2, 20)]
    batch = generate_ids(model, prompts, params)
    assert [(g.finish_reason, len(g.token_ids)) for g in batch] == [("length", 2), ("length", 20)]
    assert batch[1].token_ids == generate_ids(model, [prompts[1]], params[1])[0].token_ids


def test_seeded_sampling_is_the_same_whatever_else_is_in_the_batch(model: Transformer) -> None:
    params = [
        SamplingParams(max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.9, seed=7),
        SamplingParams(max_new_tokens=12, temperature=0.8, seed=123),
        SamplingParams(max_new_tokens=20, temperature=1.2, seed=99),
    ]
    batch = generate_ids(model, RAGGED, params)
    alone = [generate_ids(model, [p], sp)[0] for p, sp in zip(RAGGED, params)]
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    other_seed = generate_ids(model, [RAGGED[0]], SamplingParams(max_new_tokens=20, seed=8))[0]
    assert other_seed.token_ids != batch[0].token_ids


MIXED_FILTERS = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9),
                 SamplingParams(temperature=1.0, top_k=3),
                 SamplingParams(temperature=0.7, top_p=0.8),
                 SamplingParams(temperature=1.3, top_k=20, top_p=0.5),
                 SamplingParams(temperature=2.0, top_k=1000)]  # fmt: skip


def mixed_filter_trials(width: int, trials: int = 50) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Logits for MIXED_FILTERS' rows, with a tie among the top tokens, and a seed per row."""
    torch.manual_seed(0)
    for trial in range(trials):
        logits = torch.randn(len(MIXED_FILTERS), width) * 3
        logits[:, :8] = 4.0
        yield logits, [trial * 10 + i for i in range(len(MIXED_FILTERS))]


def test_batched_sampling_gives_each_row_the_token_it_gets_alone() -> None:
    """Rows with different filters sampled together, ties included, against each row alone."""
    for logits, seeds in mixed_filter_trials(64):
        together = sample_tokens(logits, MIXED_FILTERS, [Draws(s) for s in seeds])
        alone = [sample_token(row, p, Draws(s))
                 for row, p, s in zip(logits, MIXED_FILTERS, seeds)]  # fmt: skip
        assert together == alone


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(temperature=1.0), [0, 1, 2, 3, 4]),
        (SamplingParams(temperature=0.5), [0, 1, 2, 3, 4]),
        (SamplingParams(temperature=1.0, top_k=2), [3, 4]),
        (SamplingParams(temperature=1.0, top_p=0.75), [3, 4]),
    ],
    ids=["t1", "t0.5", "top-k-2", "top-p-0.75"],
)
def test_sampled_frequencies_follow_the_filtered_softmax(params, allowed) -> None:
    logits = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0])
    # The distribution sample_token should draw from, built independently of it.
    probs = torch.zeros(5, dtype=torch.float64)
    probs[allowed] = torch.softmax(logits[allowed].double() / params.temperature, dim=0)
    draws = Draws(7)
    n = 20_000
    counts = torch.bincount(
        torch.tensor([sample_token(logits, params, draws) for _ in range(n)]), minlength=5
    ).double()
    assert counts[probs == 0].sum() == 0, "a filtered-out token was sampled"
    sigma = (n * probs * (1 - probs)).sqrt()
    assert torch.all((counts - n * probs).abs() <= 4.5 * sigma + 1), (counts / n, probs)


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    rows=st.integers(1, 6),
    width=st.integers(1, 40),
)
def test_top_k_threshold_is_each_rows_kth_largest_value_whatever_the_others_ask(
    data: st.DataObject, rows: int, width: int
) -> None:
    values = data.draw(st.lists(st.lists(st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0]),
                                         min_size=width, max_size=width),
                                min_size=rows, max_size=rows))  # fmt: skip
    ks = data.draw(st.lists(st.integers(0, width), min_size=rows, max_size=rows))
    x = torch.tensor(values)
    kth_index = torch.tensor([[k - 1] for k in ks], dtype=torch.float64)
    got = _kth_largest(x, ks, kth_index)[:, 0].tolist()
    want = [sorted(row, reverse=True)[k - 1] if k else float("-inf") for row, k in zip(values, ks)]
    assert got == want


def test_the_gpus_torch_filters_pick_what_the_cpus_numpy_filters_pick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A GPU selects top-k with torch.topk and sorts top-p's probabilities with torch.sort; the
    # CPU uses NumPy. Taking the torch path on the CPU checks its logic without a GPU.
    trials = list(mixed_filter_trials(300))
    with_numpy = [sample_tokens(x, MIXED_FILTERS, [Draws(s) for s in seeds]) for x, seeds in trials]
    monkeypatch.setattr(sampling_module, "NUMPY_FILTER_DEVICES", frozenset())
    with_torch = [sample_tokens(x, MIXED_FILTERS, [Draws(s) for s in seeds]) for x, seeds in trials]
    assert with_torch == with_numpy


def _nucleus_by_ranking(logits: list[float], top_p: float) -> set[int]:
    """Top-p by its definition: rank by probability, lower id first among equals, and keep each
    token while the tokens ranked above it hold less than top_p."""
    probs = torch.softmax(torch.tensor(logits), dim=-1).tolist()
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: (-probs[i], i)):
        if mass >= top_p:
            break
        kept.add(i)
        mass += probs[i]
    return kept


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(
        # Few distinct values, so that ties (at the boundary too) are common.
        st.lists(st.sampled_from([-30.0, -2.0, 0.0, 0.5, 1.0, 3.0]), min_size=1, max_size=12),
        min_size=1, max_size=4,
    ),
    top_ps=st.lists(st.floats(0.01, 1.0), min_size=4, max_size=4),
)
def test_top_p_keeps_the_most_probable_tokens_until_their_mass_reaches_it(
    rows: list[list[float]], top_ps: list[float]
) -> None:
    width = max(len(r) for r in rows)
    logits = torch.full((len(rows), width), float("-inf"))
    for i, r in enumerate(rows):
        logits[i, : len(r)] = torch.tensor(r)
    for i, r in enumerate(rows):
        # Away from the boundary, where float32 and float64 sums may round either way.
        probs = sorted(torch.softmax(torch.tensor(r), dim=-1).tolist(), reverse=True)
        partial = [sum(probs[:k]) for k in range(1, len(probs) + 1)]
        assume(all(abs(m - top_ps[i]) > 1e-4 for m in partial))
    keep = nucleus(logits, torch.tensor(top_ps[: len(rows)]))
    for i, r in enumerate(rows):
        assert set(keep[i].nonzero().flatten().tolist()) == _nucleus_by_ranking(r, top_ps[i])


@pytest.mark.parametrize("top_p, kept", [(0.25, 1), (0.5, 2), (0.75, 3)])
def test_top_p_equal_to_the_mass_of_the_top_tokens_keeps_just_those(
    top_p: float, kept: int
) -> None:
    # Four equally likely tokens: the masses 0.25, 0.5, 0.75 are exact in float32, so the
    # boundary the property test leaves out is hit exactly: a token whose predecessors already
    # hold top_p is outside the nucleus.
    keep = nucleus(torch.zeros(1, 4), torch.tensor([top_p]))
    assert keep[0].tolist() == [True] * kept + [False] * (4 - kept)
    assert set(keep[0].nonzero().flatten().tolist()) == _nucleus_by_ranking([0.0] * 4, top_p)


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-40, 1e-45, 1e-300])
@pytest.mark.parametrize("numpy_filters", [True, False], ids=["numpy", "torch"])
def test_a_tiny_positive_temperature_samples_the_top_token(
    temperature: float, numpy_filters: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dividing logits by such a temperature overflows float32 (or the temperature rounds to 0);
    # the limit of the distribution is one-hot on the top token, which is what greedy picks.
    if not numpy_filters:
        monkeypatch.setattr(sampling_module, "NUMPY_FILTER_DEVICES", frozenset())
    torch.manual_seed(0)
    logits = torch.randn(4, 512) * 50
    params = [SamplingParams(temperature=temperature), SamplingParams(temperature=0.0),
              SamplingParams(temperature=temperature, top_k=5),
              SamplingParams(temperature=temperature, top_p=0.9)]  # fmt: skip
    tokens = sample_tokens(logits, params, [Draws(s) for s in range(4)])
    assert tokens == logits.argmax(dim=-1).tolist()


def test_generation_at_a_tiny_temperature_is_greedy(model: Transformer) -> None:
    tiny = SamplingParams(max_new_tokens=24, temperature=1e-40, seed=3, eos=False)
    sampled = generate_ids(model, RAGGED, tiny)
    greedy = generate_ids(model, RAGGED, GREEDY)
    assert [g.token_ids for g in sampled] == [g.token_ids for g in greedy]


def test_rows_with_nan_or_infinite_logits_get_no_real_token() -> None:
    logits = torch.randn(4, 50)
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    logits[3, :40] = float("-inf")  # masked ids are fine: only NaN and +inf poison a row
    logits = torch.cat([logits, torch.full((1, 50), float("-inf"))])  # ...or nothing left at all
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=5),
                   SamplingParams(temperature=1.0, top_p=0.9)):  # fmt: skip
        tokens = sample_tokens(logits, [params] * 5, [Draws(s) for s in range(5)])
        assert tokens[1] == tokens[2] == tokens[4] == 50, params
        assert 0 <= tokens[0] < 50 and 40 <= tokens[3] < 50, params


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_new_tokens=24, seed=5)],
                         ids=["greedy", "sampled"])  # fmt: skip
def test_generation_stops_with_a_clear_error_when_a_rows_logits_turn_nan(
    model: Transformer, params: SamplingParams
) -> None:
    calls = 0

    def nan_on_the_third_step(model, tokens, positions, cache, **kw):
        nonlocal calls
        logits = decode_step(model, tokens, positions, cache, **kw)
        if calls == 2:
            logits[1] = float("nan")
        calls += 1
        return logits

    with pytest.raises(NonFiniteLogitsError, match="prompt 1: .*NaN or infinite at generated "
                                                   "token 3"):  # fmt: skip
        generate_ids(model, RAGGED, params, step_fn=nan_on_the_third_step)


def test_top_k_one_is_greedy(model: Transformer) -> None:
    greedy = generate_ids(model, [RAGGED[0]], GREEDY)[0]
    top1 = generate_ids(
        model, [RAGGED[0]], SamplingParams(max_new_tokens=24, top_k=1, seed=3, eos=False)
    )[0]
    assert top1.token_ids == greedy.token_ids


def test_padded_vocab_ids_are_never_sampled(model: Transformer) -> None:
    assert model.config.padded_vocab_size > model.config.vocab_size
    out = generate_ids(model, [[1]], SamplingParams(max_new_tokens=64, temperature=2.0, seed=0))
    assert max(out[0].token_ids) < model.config.vocab_size


class SmallVocabCodec(ByteCodec):
    """ByteCodec that says how many ids it can decode: 257, fewer than the model's 300."""

    vocab_size = 257


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_new_tokens=24, temperature=2.0,
                                                           seed=0, eos=False)],
                         ids=["greedy", "sampled"])  # fmt: skip
def test_ids_the_tokenizer_cannot_decode_are_never_sampled(
    model: Transformer, params: SamplingParams
) -> None:
    codec = SmallVocabCodec()
    assert model.config.vocab_size > codec.vocab_size
    outs = generate_ids(model, RAGGED * 3, params, codec=codec)
    outs += generate(model, codec, ["hello", "x"], params)
    assert max(max(g.token_ids) for g in outs) < codec.vocab_size


def test_compiled_decode_step_has_no_graph_breaks(model: Transformer) -> None:
    cache = KVCache.for_model(model, 2, 32)
    with torch.inference_mode():
        prefill(model, [[1, 2, 3], [4, 5]], cache)
        explanation = torch._dynamo.explain(decode_step)(
            model, torch.tensor([[6], [7]]), torch.tensor([[3], [2]]), cache
        )
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_the_gpus_pinned_attention_path_compiles_whole_and_keeps_the_tokens(
    model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On CUDA, cached attention runs inside sdpa_kernel(efficient, math). Taking that path on a
    # CPU (where it means math) shows a graph break or a changed result without a GPU.
    unpinned = generate_ids(model, RAGGED, GREEDY)
    monkeypatch.setattr(model_module, "PINNED_MASKED_SDPA_DEVICES", frozenset({"cpu"}))
    pinned = generate_ids(model, RAGGED, GREEDY)
    assert [g.token_ids for g in pinned] == [g.token_ids for g in unpinned]
    cache = KVCache.for_model(model, 2, 32)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        prefill(model, [[1, 2, 3], [4, 5]], cache)
        explanation = torch._dynamo.explain(decode_step)(
            model, torch.tensor([[6], [7]]), torch.tensor([[3], [2]]), cache
        )
    assert explanation.graph_break_count == 0
    ops = {event.name for event in prof.events()}
    assert "aten::_scaled_dot_product_attention_math" in ops, sorted(ops)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in ops, sorted(ops)


def test_prompt_beyond_the_context_window_is_a_clear_error(model: Transformer) -> None:
    block = model.config.block_size
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    with pytest.raises(ContextLengthError, match="context window"):
        generate_ids(model, [[1] * (block - 5)], params)
    with pytest.raises(ContextLengthError, match="max_new_tokens"):
        generate_ids(model, [[1]], SamplingParams(max_new_tokens=block))


@pytest.mark.parametrize("bad_id", [-1, 300, 305, 600], ids=["negative", "vocab", "padding",
                                                               "past-the-table"])  # fmt: skip
def test_a_prompt_id_outside_the_vocabulary_is_a_clear_error(
    model: Transformer, bad_id: int
) -> None:
    # 300 ids in an embedding table of 320: ids in the padding used to pass unnoticed.
    assert model.config.vocab_size == 300 and model.config.padded_vocab_size > 305
    with pytest.raises(ValueError, match=rf"prompt token id {bad_id} is outside the vocabulary"):
        generate_ids(model, [[1, 2], [3, bad_id, 4]], GREEDY)


def test_left_truncation_keeps_the_end_of_the_prompt(model: Transformer) -> None:
    block = model.config.block_size
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    long_prompt = list(range(1, block + 20))
    truncated = generate_ids(model, [long_prompt], params, truncate="left")[0]
    tail = generate_ids(model, [long_prompt[-(block - 10) :]], params)[0]
    assert truncated.token_ids == tail.token_ids
    assert truncated.prompt_tokens == block - 10


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_new_tokens", {"max_new_tokens": 0}),
        ("temperature", {"temperature": -1.0}),
        ("top_k", {"top_k": -2}),
        ("top_p", {"top_p": 0.0}),
        ("stop", {"stop": ("a", "b", "c", "d", "e")}),
        # Wrong types, which used to pass and fail a whole sampling batch later on.
        ("max_new_tokens", {"max_new_tokens": True}),
        ("temperature", {"temperature": "1"}),
        ("temperature", {"temperature": True}),
        ("top_k", {"top_k": 2.5}),
        ("top_k", {"top_k": True}),
        ("top_p", {"top_p": "0.5"}),
        ("seed", {"seed": 1.5}),
        ("seed", {"seed": False}),
        ("stop", {"stop": ("a", 3)}),
        ("stop", {"stop": 3}),
        ("eos", {"eos": "no"}),
    ],
)
def test_bad_sampling_params_name_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_eos_finishes_a_row_and_is_not_part_of_the_text(model: Transformer) -> None:
    codec = ByteCodec()
    # Find what greedy produces, then declare its 5th token the end-of-text id.
    free = generate_ids(model, [[72, 105]], GREEDY)[0]
    eos = free.token_ids[4]
    first = free.token_ids.index(eos)
    out = generate_ids(model, [[72, 105]], SamplingParams(max_new_tokens=24, temperature=0.0),
                       eos_id=eos)[0]
    assert out.finish_reason == "eos"
    assert out.token_ids == free.token_ids[:first]
    assert codec.decode(out.token_ids) == codec.decode(free.token_ids[:first])


def test_with_eos_off_an_eos_token_is_generated_through_as_an_ordinary_token(
    model: Transformer,
) -> None:
    free = generate_ids(model, [[72, 105]], GREEDY)[0]  # GREEDY has eos=False
    eos = free.token_ids[4]
    out = generate_ids(model, [[72, 105]], GREEDY, eos_id=eos)[0]
    assert out.finish_reason == "length"
    assert out.token_ids == free.token_ids and eos in out.token_ids


def test_stop_string_cuts_the_text_and_streaming_never_leaks_it() -> None:
    codec = ByteCodec()
    state = SequenceState([1], SamplingParams(max_new_tokens=50, stop=("END",)), codec=codec)
    streamed = ""
    for ch in "hello EN then END and more":
        streamed += state.add_token(ord(ch))
        if state.finished:
            break
    assert state.finish_reason == "stop"
    assert state.text == "hello EN then "
    assert streamed == state.text


def test_a_stop_string_completed_on_the_last_allowed_token_finishes_stop_and_is_cut() -> None:
    state = SequenceState([1], SamplingParams(max_new_tokens=4, stop=("abc",)), codec=ByteCodec())
    streamed = "".join(state.add_token(ord(ch)) for ch in "xabc")
    assert (state.finish_reason, state.text, streamed) == ("stop", "x", "x")


class PieceCodec:
    """Each id is a fixed piece of text, so one token can add several characters."""

    eos_id = 0
    pieces = ["", "x", "abzz"]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_of_stop_strings_completed_by_one_token_the_earliest_in_the_text_cuts_it() -> None:
    # "b" is listed last and "zz" ends later: neither the first listed nor the last found wins.
    params = SamplingParams(max_new_tokens=10, stop=("zz", "b"))
    state = SequenceState([1], params, codec=PieceCodec())
    streamed = state.add_token(1) + state.add_token(2)
    assert (state.finish_reason, state.text, streamed) == ("stop", "xa", "xa")


@settings(max_examples=500, deadline=None)
@given(text=st.text("ab=", max_size=30), stop=st.text("ab=", min_size=1, max_size=8),
       data=st.data())  # fmt: skip
def test_held_back_tail_is_the_longest_that_could_begin_the_stop_string(
    text: str, stop: str, data: st.DataObject
) -> None:
    end = data.draw(st.integers(0, len(text)))
    # By definition: the longest n < len(stop) such that text[:end] ends with stop[:n].
    n = next((n for n in range(min(len(stop) - 1, end), 0, -1)
              if text[end - n : end] == stop[:n]), 0)  # fmt: skip
    assert stop_prefix_start(text, end, stop) == end - n


def test_streamed_deltas_hold_back_half_utf8_characters() -> None:
    codec = ByteCodec()
    state = SequenceState([1], SamplingParams(max_new_tokens=50), codec=codec)
    deltas = [state.add_token(b) for b in "né🙂".encode()]
    assert "\ufffd" not in "".join(deltas)
    deltas.append(state.cancel())
    assert "".join(deltas) == "né🙂"


@pytest.mark.parametrize("stop, text", [("€", "xa"), ("a€", "x")])
def test_a_stop_string_in_a_character_completed_by_a_later_token_stops_when_re_decoding(
    stop: str, text: str
) -> None:
    # ByteCodec has no stream decoder, so the text is decoded again each step: the "€" replaces
    # the U+FFFD its first bytes decoded to, in place, rather than extending the text.
    state = SequenceState([1], SamplingParams(max_new_tokens=50, stop=(stop,)), codec=ByteCodec())
    streamed = ""
    for b in "xa€bcd".encode():
        streamed += state.add_token(b)
        if state.finished:
            break
    assert (state.finish_reason, state.text, streamed) == ("stop", text, text)


class StreamingByteCodec(ByteCodec):
    """ByteCodec with the tokenizer's stream decoder (it holds back partial characters)."""

    vocab_size = 256

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id])

    def stream_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)  # type: ignore[arg-type]


@pytest.mark.parametrize("end, reason", [("length", "stop"), ("eos", "stop"),
                                         ("cancel", "cancelled")])  # fmt: skip
def test_a_stop_string_completed_by_the_decoders_final_flush_cuts_the_text(
    end: str, reason: str
) -> None:
    # "€"'s lead byte left dangling decodes to U+FFFD only when the decoder is flushed; followed
    # by "b" it would have been fed as U+FFFD and stopped there.
    params = SamplingParams(max_new_tokens=2 if end == "length" else 50, stop=("\ufffd",))
    state = SequenceState([1], params, codec=StreamingByteCodec())
    streamed = state.add_token(ord("a")) + state.add_token("€".encode()[0])
    if end == "eos":
        streamed += state.add_token(StreamingByteCodec.eos_id)
    elif end == "cancel":
        streamed += state.cancel()
    assert (state.finish_reason, state.text, streamed) == (reason, "a", "a")


def test_text_generation_with_a_codec(model: Transformer) -> None:
    codec = ByteCodec()
    outs = generate(model, codec, ["ab", ""], SamplingParams(max_new_tokens=8, seed=1, eos=False))
    assert [len(o.token_ids) for o in outs] == [8, 8]
    assert outs[1].prompt_tokens == 1  # empty prompt starts from end-of-text


def test_kv_cache_bytes_match_the_formula(model: Transformer) -> None:
    cfg = model.config
    for batch, max_len in [(1, 16), (4, 128)]:
        cache = KVCache.for_model(model, batch, max_len)
        assert cache.nbytes == 2 * cfg.n_layer * batch * max_len * cfg.n_embd * 4
    half = KVCache.for_model(model, 2, 64, dtype=torch.bfloat16)
    assert half.nbytes == 2 * cfg.n_layer * 2 * 64 * cfg.n_embd * 2


@pytest.mark.gpu
def test_sampling_on_cuda_picks_what_the_cpu_picks_from_the_same_logits() -> None:
    # The draws are a function of (seed, step) made on the host, so a device changes only the
    # rounding of the filters and the cdf (and the filters use torch's sort and top-k there,
    # NumPy here).
    for logits, seeds in mixed_filter_trials(300):
        on_cpu = sample_tokens(logits, MIXED_FILTERS, [Draws(s) for s in seeds])
        assert sample_tokens(logits.cuda(), MIXED_FILTERS, [Draws(s) for s in seeds]) == on_cpu


@pytest.mark.gpu
def test_greedy_run_ahead_on_cuda_matches_full_recompute_eager_and_compiled() -> None:
    # On CUDA greedy cached decoding queues each step before reading the last tokens; rows that
    # stop at different steps (lengths, eos) must not be disturbed by the step queued past them.
    cuda_model = context_sensitive_model(0, vocab_size=300).cuda()
    lengths = [SamplingParams(max_new_tokens=n, temperature=0.0, eos=False) for n in (24, 3, 11)]
    reference = generate_ids(cuda_model, RAGGED, lengths, use_cache=False)
    eager = generate_ids(cuda_model, RAGGED, lengths)
    step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    compiled = generate_ids(cuda_model, RAGGED, lengths, step_fn=step)
    want = [g.token_ids for g in reference]
    assert [len(ids) for ids in want] == [24, 3, 11]
    assert [g.token_ids for g in eager] == want
    assert [g.token_ids for g in compiled] == want
    eos = want[0][5]
    stopped = generate_ids(cuda_model, [RAGGED[0]], SamplingParams(max_new_tokens=24,
                           temperature=0.0), eos_id=eos)[0]
    assert stopped.finish_reason == "eos" and stopped.token_ids == want[0][: want[0].index(eos)]


@pytest.mark.gpu
def test_cached_attention_on_cuda_avoids_the_backend_that_does_not_repeat_bit_for_bit() -> None:
    # On an H200 in bf16, SDPA's default pick for masked attention gave different logits run to
    # run (scripts/gpu_determinism.py); the model holds cached attention to efficient or math.
    cuda_model = context_sensitive_model(0, vocab_size=300).cuda().to(torch.bfloat16)
    cache = KVCache.for_model(cuda_model, 2, 32)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        prefill(cuda_model, RAGGED[:2], cache)
        decode_step(cuda_model, torch.tensor([[6], [7]], device="cuda"),
                    torch.tensor([[7], [1]], device="cuda"), cache)  # fmt: skip
    ops = {event.name for event in prof.events()}
    assert "aten::_scaled_dot_product_efficient_attention" in ops, sorted(ops)
    assert not any("cudnn_attention" in name for name in ops), sorted(ops)


@pytest.mark.parametrize("truncate", ["right", "Left", None])
def test_an_unknown_truncate_policy_is_refused_naming_it_even_when_the_prompt_fits(
    model: Transformer, truncate: object
) -> None:
    with pytest.raises(ValueError, match="truncate must be 'error' or 'left'"):
        generate_ids(model, [[1, 2, 3]], GREEDY, truncate=truncate)  # type: ignore[arg-type]
