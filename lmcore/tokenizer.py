"""Byte-level BPE tokenizer (HF `tokenizers`): train, encode/decode with exact round trip, stream.

Must not normalise or drop anything: decode(encode(s)) == s for every Unicode string.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# 256 byte symbols + the eos token: the smallest vocabulary that can encode any input.
MIN_VOCAB_SIZE = 257
_SURROGATE = re.compile("[\ud800-\udfff]")


def _as_text(text: str) -> str:
    """`text` with each lone surrogate as U+FFFD, as a lossy UTF-8 decoder reads it. A Python
    str may hold them (an undecodable argv byte, a JSON escape) but they are not text, and HF
    tokenizers refuses them with a TypeError."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-char map, inverted: vocab symbol -> byte value."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _check_exact_round_trip(spec: dict) -> None:
    """Refuse a tokenizer.json outside the family `Tokenizer.train` makes, whose decode(encode(s))
    may differ from s: a normalizer (NFKC turns "ﬁ" into "fi"), a pre-tokenizer or decoder other
    than byte-level, a prefix space, added tokens that strip the whitespace next to them, or a
    BPE that drops or marks pieces. GPT-2's own file (a byte-level post-processor, empty
    subword affixes) is of the family. An added token that does not decode to its own text is
    refused when the byte table is built (`Tokenizer._build_token_bytes`)."""

    def part(name: str) -> dict:
        return spec.get(name) or {}

    pre, model = part("pre_tokenizer"), part("model")
    problems = {
        "a normalizer": spec.get("normalizer") is not None,
        "a pre-tokenizer other than ByteLevel": pre.get("type") != "ByteLevel",
        "a prefix space": bool(pre.get("add_prefix_space")),
        "a decoder other than ByteLevel": part("decoder").get("type") != "ByteLevel",
        "a post-processor other than ByteLevel":
            part("post_processor").get("type", "ByteLevel") != "ByteLevel",
        "a model other than BPE": model.get("type") != "BPE",
        "BPE dropout": bool(model.get("dropout")),
        "subword prefixes or suffixes": bool(model.get("continuing_subword_prefix")
                                             or model.get("end_of_word_suffix")),
        "added tokens that strip whitespace": any(
            t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or ()),
    }
    found = [name for name, present in problems.items() if present]
    if found:
        raise ValueError(f"tokenizer has {', '.join(found)}: lmcore needs the byte-level BPE "
                         "family Tokenizer.train makes, whose decode(encode(s)) is s")


def _check_eos_is_special(hf: HFTokenizer, eos_id: int) -> None:
    """Refuse an eos that is not an added token marked special (HF's add_tokens makes one with
    special=False): plain encode would then turn the text "<|endoftext|>" in user input into
    the eos id, which only special tokens are kept from."""
    added = hf.get_added_tokens_decoder().get(eos_id)
    if added is None or not added.special:
        raise ValueError(f"tokenizer's {EOS_TOKEN} (id {eos_id}) is not an added token marked "
                         '"special": true in "added_tokens": user text could encode to eos')


class Tokenizer:
    """A byte-level BPE tokenizer with one special token, `<|endoftext|>` (eos).

    Special-token text: `encode(text)` treats a literal "<|endoftext|>" in `text` as plain
    characters (several ordinary tokens), so any text round-trips and user input can never
    inject an eos. `encode(text, allow_special=True)` maps it to `eos_id` instead.
    `decode` skips nothing: the eos id decodes to "<|endoftext|>". A lone surrogate (not
    Unicode text, though a Python str may hold one) encodes as U+FFFD. A tokenizer.json's
    `truncation` and `padding` sections are ignored (`to_str` and `save` write them as null):
    encode never cuts or pads.
    """

    def __init__(self, hf: HFTokenizer) -> None:
        eos_id = hf.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise ValueError(f"tokenizer has no {EOS_TOKEN} token")
        self.eos_id: int = eos_id
        _check_eos_is_special(hf, eos_id)
        spec = json.loads(hf.to_str())
        _check_exact_round_trip(spec)
        # `truncation` and `padding` (saved by HF tooling after enable_truncation/enable_padding)
        # are dropped, not refused: they are encode options, not vocabulary, and HF would apply
        # them silently, cutting each prompt's end or appending pad ids. lmcore sets lengths
        # itself (ContextLengthError, or truncate="left", which keeps the end) and never pads,
        # so dropping them changes no id lmcore means to make; refusing would make a working
        # model dir unusable until its tokenizer.json is hand-edited.
        spec["truncation"] = spec["padding"] = None
        text = json.dumps(spec)
        # Two engines over one vocabulary instead of toggling a flag per call, so encode stays
        # thread-safe (the serving engine and the API encode from different threads).
        self._hf_special = HFTokenizer.from_str(text)
        self._hf_plain = HFTokenizer.from_str(text)
        self._hf_plain.encode_special_tokens = True
        self._token_bytes = self._build_token_bytes(self._hf_special)

    @staticmethod
    def _build_token_bytes(hf: HFTokenizer) -> list[bytes]:
        # id -> raw bytes, for the streaming decoder; also checks that this really is byte-level.
        table = _byte_decoder()
        added = {i: t.content for i, t in hf.get_added_tokens_decoder().items()}
        out: list[bytes] = []
        for i in range(hf.get_vocab_size(with_added_tokens=True)):
            if i in added:
                # HF sends an added token's text through the ByteLevel decoder too, which reads
                # a token made only of byte-alphabet characters ("é", "Ā") as those bytes.
                decoded = hf.decode([i], skip_special_tokens=False)
                if decoded != added[i]:
                    raise ValueError(f"tokenizer has an added token that does not decode to its "
                                     f"own text (token {i}: {added[i]!r} decodes to "
                                     f"{decoded!r}), so decode(encode(s)) would not be s")
                out.append(added[i].encode("utf-8"))
                continue
            tok = hf.id_to_token(i)
            if tok is None or any(c not in table for c in tok):
                raise ValueError(f"not a byte-level BPE tokenizer (token {i}: {tok!r})")
            out.append(bytes(table[c] for c in tok))
        return out

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2
    ) -> Tokenizer:
        """Train on `texts`. The result has at most `vocab_size` ids (fewer on a small corpus)."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + eos), "
                             f"got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[AddedToken(EOS_TOKEN, special=True, normalized=False)],
            # All 256 byte symbols, seen or not, so every input is encodable.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def from_str(cls, data: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(data))

    def to_str(self) -> str:
        return self._hf_special.to_str()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer.json file, or a directory that contains one."""
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        return cls.from_str(p.read_text(encoding="utf-8"))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json: `path` is the file if it ends in .json, else a directory.

        Written to a temp file and renamed, so a reader never sees half a file. Returns the file.
        """
        p = Path(path)
        if p.suffix != ".json":
            p = p / TOKENIZER_FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_str())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; model dirs are shared
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return p

    # -- encode / decode ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._hf_special.get_vocab_size(with_added_tokens=True)

    def _engine(self, allow_special: bool) -> HFTokenizer:
        return self._hf_special if allow_special else self._hf_plain

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        return self._engine(allow_special).encode(_as_text(text), add_special_tokens=False).ids

    def encode_batch(
        self, texts: Sequence[str], *, allow_special: bool = False
    ) -> list[list[int]]:
        # Runs in parallel in Rust; same ids as encode() on each text.
        encs = self._engine(allow_special).encode_batch([_as_text(t) for t in texts],
                                                        add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`. Bytes that do not form valid UTF-8 decode to U+FFFD."""
        if hasattr(ids, "tolist"):  # numpy arrays, memmaps, torch tensors
            ids = ids.tolist()
        ids = list(ids)
        # HF silently drops unknown ids; an out-of-range id here is a caller bug, so say so.
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): "
                             f"{min(ids) if min(ids) < 0 else max(ids)}")
        return self._hf_special.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (may be part of a UTF-8 character)."""
        return self._token_bytes[token_id]

    def stream_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas, holding back incomplete UTF-8 characters.

    `"".join(feed(i) for i in ids) + flush() == tokenizer.decode(ids)`; a delta never ends in a
    U+FFFD for a character whose remaining bytes may still arrive.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # errors="replace" matches decode() (Rust's from_utf8_lossy): both replace each maximal
        # invalid subpart with one U+FFFD; final=False keeps an unfinished tail buffered.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (often "", never partial)."""
        if not 0 <= token_id < self._tokenizer.vocab_size:
            raise ValueError(f"token id out of range [0, {self._tokenizer.vocab_size}): "
                             f"{token_id}")
        return self._utf8.decode(self._tokenizer.token_bytes(int(token_id)), final=False)

    def flush(self) -> str:
        """End of stream: emit what is left (a dangling partial character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete character are held back."""
        return bool(self._utf8.getstate()[0])
