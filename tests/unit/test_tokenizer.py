"""lmcore.tokenizer: exact round trip, special-token handling, persistence, streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import AddedToken, models, pre_tokenizers

from lmcore.tokenizer import EOS_TOKEN, IncrementalDecoder, Tokenizer

pytestmark = pytest.mark.unit

CORPUS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\n  Or to take arms against a sea of troubles.\n",
    "Café naïve résumé — «quoted» 'single' \"double\"\ttabs\r\nwindows newline",
    "日本語のテキストです。中文文本。한국어 텍스트.",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 and flags 🇬🇧🇯🇵",
]
TRICKY = [
    "",
    " ",
    "   leading and trailing   ",
    "\n\n\t \r\n",
    "\x00",
    "a\x00b\x00",
    "e\u0301 a\u0308 combining",
    "\u0301 leading combining mark",
    "😀",
    "👨‍👩‍👧‍👦 zwj family",
    "🇯🇵🇬🇧",
    "日本語のテキスト",
    "\ufeffBOM\ufffe\uffff nonchars",
    "\U0010ffff max code point",
    "\x7f\x80\x9f control",
    EOS_TOKEN,
    f"a{EOS_TOKEN}b",
    f"{EOS_TOKEN}{EOS_TOKEN}",
    "<|endoftext",
    "<|endoftext|> <|endoftext|>\n",
]
SETTINGS = settings(max_examples=150, deadline=None)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS * 20, vocab_size=400)


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_round_trip_exactly(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@SETTINGS
@given(text=st.text())
def test_any_text_round_trips_exactly(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@SETTINGS
@given(parts=st.lists(st.one_of(st.text(max_size=20), st.just(EOS_TOKEN)), max_size=6))
def test_text_with_special_token_round_trips_in_both_modes(
    tok: Tokenizer, parts: list[str]
) -> None:
    text = "".join(parts)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=True)) == text


def test_literal_special_token_text_is_plain_text_by_default(tok: Tokenizer) -> None:
    ids = tok.encode(f"hi {EOS_TOKEN} there")
    assert tok.eos_id not in ids
    assert len(tok.encode(EOS_TOKEN)) > 1


def test_allow_special_maps_special_token_text_to_eos_id(tok: Tokenizer) -> None:
    ids = tok.encode(f"hi{EOS_TOKEN}there{EOS_TOKEN}", allow_special=True)
    assert ids.count(tok.eos_id) == 2
    assert ids[-1] == tok.eos_id


def test_eos_id_decodes_to_special_token_text(tok: Tokenizer) -> None:
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    assert tok.decode(tok.encode("a") + [tok.eos_id] + tok.encode("b")) == f"a{EOS_TOKEN}b"


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]
    texts = [f"x{EOS_TOKEN}y", "plain"]
    assert tok.encode_batch(texts, allow_special=True) == [
        tok.encode(t, allow_special=True) for t in texts
    ]


def test_a_lone_surrogate_encodes_as_the_replacement_character(tok: Tokenizer) -> None:
    """A str may hold lone surrogates (a non-UTF-8 argv byte arrives as one): HF tokenizers
    raised TypeError on them, so `lmctl generate` with such a prompt ended in a traceback."""
    text, expected = "caf\udce9 and \ud800 end", "caf\ufffd and \ufffd end"
    assert tok.encode(text) == tok.encode(expected)
    assert tok.decode(tok.encode(text)) == expected
    assert tok.encode_batch([text, "plain"]) == [tok.encode(expected), tok.encode("plain")]


def test_decode_accepts_numpy_arrays(tok: Tokenizer) -> None:
    import numpy as np

    ids = tok.encode("To be, or not")
    assert tok.decode(np.asarray(ids, dtype=np.uint16)) == "To be, or not"


def test_decode_rejects_out_of_range_ids(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


def test_trained_vocab_size_is_exactly_the_requested_size_when_corpus_allows() -> None:
    small = Tokenizer.train(CORPUS * 20, vocab_size=300)
    assert small.vocab_size == 300
    assert max(max(small.encode(t), default=0) for t in CORPUS) < 300
    # A tiny corpus cannot fill a big vocabulary: never more than asked for.
    assert Tokenizer.train(["ab ab ab"], vocab_size=5000).vocab_size <= 5000


def test_eos_is_a_single_token_in_the_vocabulary(tok: Tokenizer) -> None:
    assert tok.eos_id == json.loads(tok.to_str())["added_tokens"][0]["id"]
    assert tok.encode(EOS_TOKEN, allow_special=True) == [tok.eos_id]


def test_train_rejects_vocab_smaller_than_byte_alphabet() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(CORPUS, vocab_size=100)


def test_text_with_bytes_never_seen_in_training_still_round_trips() -> None:
    ascii_only = Tokenizer.train(["aaa bbb aaa bbb"] * 10, vocab_size=270)
    text = "ẞ☃ \x00 😀 日本"
    assert ascii_only.decode(ascii_only.encode(text)) == text


@pytest.mark.parametrize("target", ["tokenizer.json", "model_dir", "nested/dir/tok.json"])
def test_save_then_load_gives_identical_encodings(
    tok: Tokenizer, tmp_path: Path, target: str
) -> None:
    written = tok.save(tmp_path / target)
    assert written.name.endswith(".json") and written.is_file()
    assert not list(written.parent.glob("*.tmp"))  # atomic write leaves no temp file
    # Load from the file and, where it is tokenizer.json, from its directory too.
    loaded = [Tokenizer.load(written)]
    if written.name == "tokenizer.json":
        loaded.append(Tokenizer.load(written.parent))
    for other in loaded:
        assert other.vocab_size == tok.vocab_size
        assert other.eos_id == tok.eos_id
        for text in TRICKY + CORPUS:
            assert other.encode(text) == tok.encode(text)
            assert other.encode(text, allow_special=True) == tok.encode(text, allow_special=True)


def test_to_str_from_str_round_trip(tok: Tokenizer) -> None:
    again = Tokenizer.from_str(tok.to_str())
    assert again.to_str() == tok.to_str()
    assert [again.encode(t) for t in CORPUS] == [tok.encode(t) for t in CORPUS]


def test_loading_a_tokenizer_without_eos_is_rejected() -> None:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(ValueError, match="endoftext"):
        Tokenizer.from_str(hf.to_str())


def _edited(tok: Tokenizer, edit: str) -> str:
    spec = json.loads(tok.to_str())
    if edit == "normalizer":
        spec["normalizer"] = {"type": "NFKC"}
    elif edit == "pre-tokenizer":
        spec["pre_tokenizer"] = {"type": "Whitespace"}
    elif edit == "prefix space":
        spec["pre_tokenizer"]["add_prefix_space"] = True
    elif edit == "decoder":
        spec["decoder"] = None
    elif edit == "dropout":
        spec["model"]["dropout"] = 0.1
    elif edit == "strip":
        spec["added_tokens"][0]["lstrip"] = True
    elif edit == "truncation":  # as HF's enable_truncation(3) saves it
        spec["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst",
                              "stride": 0}  # fmt: skip
    elif edit == "padding":  # as HF's enable_padding(length=16, pad_token=eos) saves it
        spec["padding"] = {"strategy": {"Fixed": 16}, "direction": "Right",
                           "pad_to_multiple_of": None, "pad_id": tok.eos_id, "pad_type_id": 0,
                           "pad_token": EOS_TOKEN}  # fmt: skip
    elif edit == "eos not special":  # as HF's add_tokens makes it
        [eos] = [t for t in spec["added_tokens"] if t["content"] == EOS_TOKEN]
        eos["special"] = False
    elif edit == "eos not added":  # only a piece of the BPE vocabulary
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != EOS_TOKEN]
    elif edit == "gpt2":  # how GPT-2's own tokenizer.json differs, none of it lossy
        spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True,
                                  "trim_offsets": False, "use_regex": True}  # fmt: skip
        spec["model"]["continuing_subword_prefix"] = spec["model"]["end_of_word_suffix"] = ""
    return json.dumps(spec)


@pytest.mark.parametrize(
    ("edit", "words"),
    [("normalizer", "a normalizer"), ("pre-tokenizer", "pre-tokenizer other than ByteLevel"),
     ("prefix space", "a prefix space"), ("decoder", "decoder other than ByteLevel"),
     ("dropout", "BPE dropout"), ("strip", "strip whitespace")],
)  # fmt: skip
def test_a_tokenizer_file_that_alters_text_is_refused_naming_why(
    tok: Tokenizer, edit: str, words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        Tokenizer.from_str(_edited(tok, edit))


@pytest.mark.parametrize("edit", ["eos not special", "eos not added"])
def test_a_tokenizer_file_whose_eos_is_not_special_is_refused_so_user_text_cannot_inject_it(
    tok: Tokenizer, edit: str
) -> None:
    # Such a file used to load, and plain encode("hello<|endoftext|>") ended in eos_id.
    with pytest.raises(ValueError, match='endoftext.* not an added token marked "special"'):
        Tokenizer.from_str(_edited(tok, edit))


def test_truncation_and_padding_in_a_tokenizer_file_are_dropped_so_encode_neither_cuts_nor_pads(
    tok: Tokenizer, tmp_path: Path
) -> None:
    """HF applies both inside encode: "the king speaks" came back from a max_length 3 file as
    "the king", and each encoding was padded to 16 ids with eos."""
    both = json.loads(_edited(tok, "truncation"))
    both["padding"] = json.loads(_edited(tok, "padding"))["padding"]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(both), encoding="utf-8")
    loaded = Tokenizer.load(path)
    texts = [CORPUS[0], "a", f"x{EOS_TOKEN}"]
    for text in texts:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
        assert loaded.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
    assert loaded.encode_batch(texts) == [tok.encode(t) for t in texts]
    saved = json.loads(loaded.to_str())
    assert saved["truncation"] is None and saved["padding"] is None


def _with_added(tok: Tokenizer, content: str, special: bool) -> str:
    hf = HFTokenizer.from_str(tok.to_str())
    hf.add_tokens([AddedToken(content, special=special, normalized=False)])
    return hf.to_str()


@pytest.mark.parametrize(("content", "special"), [("é", False), ("Ā", False), ("é", True)])
def test_an_added_token_whose_text_does_not_decode_to_itself_is_refused(
    tok: Tokenizer, content: str, special: bool
) -> None:
    """HF decodes added-token text through the ByteLevel decoder, which reads "é" as the byte
    0xE9: such a tokenizer.json used to load, and decode(encode("x é y")) was "x \ufffd y"."""
    with pytest.raises(ValueError, match=f"added token .*{content!r} decodes to"):
        Tokenizer.from_str(_with_added(tok, content, special))


@pytest.mark.parametrize(("content", "special"), [("  ", False), ("a\nb", False),
                                                  ("<tag é>", False), ("<|im_start|>", True),
                                                  ("<｜x｜>", True)])
def test_added_tokens_that_decode_to_themselves_are_accepted_and_round_trip(
    tok: Tokenizer, content: str, special: bool
) -> None:
    # The ByteLevel decoder maps a token's characters to bytes only where every one of them is
    # in its byte alphabet; a space or a "｜" keeps the whole token as its own text.
    added = Tokenizer.from_str(_with_added(tok, content, special))
    text = f"x {content} y"
    for allow in (False, True):
        ids = added.encode(text, allow_special=allow)
        assert added.decode(ids) == text
        assert "".join(_stream(added, ids)[0]) + _stream(added, ids)[1] == text


def test_a_gpt2_shaped_tokenizer_file_is_accepted_and_round_trips(tok: Tokenizer) -> None:
    gpt2 = Tokenizer.from_str(_edited(tok, "gpt2"))
    for text in TRICKY + CORPUS:
        assert gpt2.decode(gpt2.encode(text)) == text
        assert gpt2.encode(text) == tok.encode(text)


# -- streaming decode ----------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    dec = tok.stream_decoder()
    assert isinstance(dec, IncrementalDecoder)
    return [dec.feed(i) for i in ids], dec.flush()


@pytest.mark.parametrize("text", ["😀🎉👍🏽", "👨‍👩‍👧 family", "日本語のテキスト", "mixed 中文 and emoji 🇬🇧!"])
def test_stream_deltas_concatenate_to_decode_for_emoji_and_cjk(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids) == text
    assert tail == ""
    assert not any("\ufffd" in d for d in deltas)


def test_stream_holds_back_a_character_split_across_tokens(tok: Tokenizer) -> None:
    # Byte-level BPE with a small vocab splits a rare 4-byte emoji over several byte tokens.
    ids = tok.encode("🦜")
    assert len(ids) > 1
    dec = tok.stream_decoder()
    deltas = [dec.feed(i) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🦜"
    assert not dec.pending


def test_stream_flush_replaces_a_dangling_partial_character(tok: Tokenizer) -> None:
    ids = tok.encode("🦜")[:-1]
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) == ""
    assert tail == "\ufffd" == tok.decode(ids)


@SETTINGS
@given(text=st.text())
def test_stream_deltas_concatenate_to_decode_for_any_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas)


@SETTINGS
@given(data=st.data())
def test_stream_matches_decode_for_arbitrary_id_sequences(
    tok: Tokenizer, data: st.DataObject
) -> None:
    # Model output need not be valid UTF-8: both paths must replace bad bytes the same way.
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids)


def test_stream_rejects_out_of_range_ids(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="out of range"):
        tok.stream_decoder().feed(tok.vocab_size)
