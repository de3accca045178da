"""Model dirs: exact round trips, and refusals that name the problem."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmcore.checkpoint import (
    CheckpointError,
    load_model_dir,
    load_model_file,
    save_model_dir,
    unwrap_model,
)
from lmcore.config import preset
from lmcore.model import Transformer
from lmcore.quantize import Int8Linear, quantize_int8, quantize_per_channel
from lmcore.tokenizer import Tokenizer
from lmcore.train_state import save_training_state

pytestmark = pytest.mark.unit

TEXTS = ["the quick brown fox jumps over the lazy dog. " * 4, "hello world, hello model. " * 4]


def tiny_model(seed: int = 0, **overrides: object) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("tiny", block_size=32, **overrides))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=300)


def batch(step: int, vocab: int = 512, size: tuple[int, int] = (2, 16)) -> torch.Tensor:
    return torch.randint(0, vocab, size, generator=torch.Generator().manual_seed(1000 + step))


# -- model dir ----------------------------------------------------------------------------------


def test_model_dir_round_trip_gives_identical_logits(tmp_path: Path, tokenizer: Tokenizer) -> None:
    model = tiny_model().eval()
    out = save_model_dir(tmp_path / "m", model, tokenizer, {"run_id": "abc", "step": 7})
    loaded = load_model_dir(out)
    idx = batch(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx)[0], model(idx)[0], atol=0, rtol=0)
    assert not loaded.model.training
    assert loaded.config == model.config
    assert loaded.metadata == {"run_id": "abc", "step": 7}
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.encode("hello world") == tokenizer.encode("hello world")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"
    ]


def test_tied_embeddings_stay_tied_after_load_and_are_stored_once(tmp_path: Path) -> None:
    save_model_dir(tmp_path, tiny_model())
    stored = load_file(tmp_path / "model.safetensors")
    assert "tok_emb.weight" in stored and "head.weight" not in stored
    model = load_model_dir(tmp_path).model
    assert model.head.weight is model.tok_emb.weight


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_loading_draws_no_random_numbers(tmp_path: Path, quantized: bool) -> None:
    # No random init that the file's tensors would replace, and no global draws while the
    # layout is measured: a caller's seeded stream is the same after a load as before it.
    save_model_dir(tmp_path, Transformer(preset("tiny")))
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    load_model_dir(tmp_path, quantized=quantized)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
def test_loading_a_model_dir_leaves_the_compiler_unimported(
    tmp_path: Path, quantized: bool
) -> None:
    # Importing torch._dynamo costs ~1 s, which a load that compiles nothing must not pay (it
    # did while the model was built on the meta device, whose init ops import it).
    save_model_dir(tmp_path, tiny_model())
    code = (
        "import sys\n"
        "from lmcore.checkpoint import load_model_dir\n"
        f"load_model_dir({str(tmp_path)!r}, quantized={quantized})\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_model_dir_loaded_in_another_dtype_holds_what_a_cast_gives(tmp_path: Path) -> None:
    # The file's tensors are cast as they are copied in, not after a full copy in fp32.
    model = tiny_model()
    save_model_dir(tmp_path, model)
    loaded = load_model_dir(tmp_path, dtype=torch.bfloat16).model
    for (name, want), got in zip(model.to(torch.bfloat16).state_dict().items(),
                                 loaded.state_dict().values()):
        assert got.dtype == torch.bfloat16, name
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert loaded.head.weight is loaded.tok_emb.weight


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_int8_load_holds_what_quantizing_the_loaded_model_gives(
    tmp_path: Path, tied: bool, dtype: torch.dtype | None
) -> None:
    # Linears are quantized as their tensors come in, not after the whole model is loaded.
    model = tiny_model(tie_embeddings=tied)
    save_model_dir(tmp_path, model)
    loaded = load_model_dir(tmp_path, dtype=dtype, quantized=True).model
    want = quantize_int8(model.to(dtype or torch.float32)).state_dict()
    got = loaded.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=0, msg=name)
    assert isinstance(loaded.head, Int8Linear)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_an_int8_load_for_another_device_stages_the_float_model_on_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tied: bool
) -> None:
    # "meta" stands in for a GPU: only one float weight may be on it, the one being quantized.
    save_model_dir(tmp_path, tiny_model(tie_embeddings=tied))
    built: list[Transformer] = []
    uninitialized = Transformer.uninitialized

    def build(*args: object, **kwargs: object) -> Transformer:
        built.append(uninitialized(*args, **kwargs))
        return built[-1]

    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The last model built is the one loaded (config.json is checked on one built before).
        on_device = sum(p.numel() for p in built[-1].parameters() if p.device.type == "meta")
        assert weight.device.type == "meta"
        assert on_device <= weight.numel() + weight.shape[0]  # this weight and its bias at most
        quantized.append(weight.shape)
        return quantize_per_channel(weight)

    quantized: list[torch.Size] = []
    monkeypatch.setattr(Transformer, "uninitialized", build)
    monkeypatch.setattr("lmcore.quantize.quantize_per_channel", quantize)
    loaded = load_model_dir(tmp_path, device="meta", quantized=True).model
    assert len(quantized) == sum(isinstance(m, Int8Linear) for m in loaded.modules())
    assert {t.device.type for t in loaded.state_dict().values()} == {"meta"}
    assert isinstance(loaded.head, Int8Linear)
    assert (loaded.tok_emb.weight is loaded.head.weight) == tied


def test_untied_model_round_trips_both_matrices(tmp_path: Path) -> None:
    model = tiny_model(tie_embeddings=False)
    save_model_dir(tmp_path, model)
    loaded = load_model_dir(tmp_path).model
    assert loaded.head.weight is not loaded.tok_emb.weight
    torch.testing.assert_close(loaded.head.weight, model.head.weight, atol=0, rtol=0)


def test_model_dir_without_tokenizer_loads_with_none(tmp_path: Path) -> None:
    save_model_dir(tmp_path, tiny_model())
    assert load_model_dir(tmp_path).tokenizer is None


def test_bf16_model_keeps_its_dtype_and_load_can_cast(tmp_path: Path) -> None:
    model = tiny_model().to(torch.bfloat16)
    save_model_dir(tmp_path, model)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model_dir(tmp_path).model.tok_emb.weight.dtype == torch.bfloat16
    as_fp32 = load_model_dir(tmp_path, dtype=torch.float32).model
    assert as_fp32.tok_emb.weight.dtype == torch.float32
    torch.testing.assert_close(as_fp32.tok_emb.weight, model.tok_emb.weight.float(), atol=0, rtol=0)


def test_wrapped_models_save_without_wrapper_prefixes(tmp_path: Path) -> None:
    model = tiny_model()
    wrapped = torch.compile(torch.nn.DataParallel(model))  # compiles lazily: never run here
    assert unwrap_model(wrapped) is model
    save_model_dir(tmp_path, wrapped)
    names = load_file(tmp_path / "model.safetensors")
    assert all(not n.startswith(("module.", "_orig_mod.")) for n in names)
    load_model_dir(tmp_path)


def test_saving_over_an_existing_dir_replaces_it_and_leaves_no_temp_dirs(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    target = tmp_path / "m"
    save_model_dir(target, tiny_model(seed=0), tokenizer, metadata={"v": 1})
    second = tiny_model(seed=1)
    save_model_dir(target, second, metadata={"v": 2})
    loaded = load_model_dir(target)
    assert loaded.metadata == {"v": 2}
    assert not (target / "tokenizer.json").exists()  # replaced whole, not merged
    torch.testing.assert_close(loaded.model.tok_emb.weight, second.tok_emb.weight, atol=0, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def _not_a_model_dir(target: Path, kind: str) -> None:
    """Something save_model_dir must not delete, at `target`."""
    if kind == "folder-of-models":
        save_model_dir(target / "older-model", tiny_model())
        (target / "notes.txt").write_text("weeks of work")
    elif kind == "model-dir-and-more":
        save_model_dir(target, tiny_model())
        (target / "notes.txt").write_text("weeks of work")
    elif kind == "another-tools-model":
        save_model_dir(target, tiny_model())
        (target / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    elif kind == "checkpoint-dir":
        model = tiny_model()
        save_training_state(target, 1, model=model, optimizer=torch.optim.AdamW(model.parameters()))
    else:
        target.write_text("weeks of work")


@pytest.mark.parametrize("kind", ["folder-of-models", "model-dir-and-more", "another-tools-model",
                                  "checkpoint-dir", "file"])  # fmt: skip
def test_saving_over_what_is_not_a_model_dir_is_refused_and_deletes_nothing(
    tmp_path: Path, kind: str
) -> None:
    """The save swapped out whatever was at the target and deleted it: a folder of older
    models, or every checkpoint when train.model_dir was train.checkpoint_dir."""
    target = tmp_path / "target"
    _not_a_model_dir(target, kind)
    before = sorted((str(p), p.read_bytes() if p.is_file() else None)
                    for p in [target, *target.rglob("*")])  # fmt: skip
    with pytest.raises(FileExistsError, match=re.escape(f"{target}: exists and is not a model")):
        save_model_dir(target, tiny_model(seed=1))
    after = sorted((str(p), p.read_bytes() if p.is_file() else None)
                   for p in [target, *target.rglob("*")])  # fmt: skip
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["target"]  # no temp dir left either


def test_failed_save_leaves_the_previous_dir_intact(tmp_path: Path) -> None:
    target = tmp_path / "m"
    save_model_dir(target, tiny_model(), metadata={"v": 1})
    with pytest.raises(ValueError, match="JSON"):
        save_model_dir(target, tiny_model(), metadata={"bad": object()})
    assert load_model_dir(target).metadata == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_quantized_model_is_refused_and_the_existing_dir_kept(tmp_path: Path) -> None:
    target = tmp_path / "m"
    save_model_dir(target, tiny_model(), metadata={"v": 1})
    with pytest.raises(ValueError, match="quantized"):
        save_model_dir(target, quantize_int8(tiny_model()), metadata={"v": 2})
    assert load_model_dir(target).metadata == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_dir_republished_while_it_is_read_is_read_again_whole(
    tmp_path: Path, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmcore.checkpoint as checkpoint

    target = tmp_path / "live"
    other_tokenizer = Tokenizer.train(["zzz yyy xxx qqq " * 50], vocab_size=300)
    second = tiny_model(seed=1)
    save_model_dir(target, tiny_model(seed=0), tokenizer, {"v": "A"})
    read_tokenizer = checkpoint._read_tokenizer
    reads: list[Path] = []

    def republish_after_the_first_read(path: Path, config: object) -> Tokenizer | None:
        got = read_tokenizer(path, config)  # type: ignore[arg-type]
        reads.append(path)
        if len(reads) == 1:  # B renamed over A between A's tokenizer and A's weights
            save_model_dir(target, second, other_tokenizer, {"v": "B"})
        return got

    monkeypatch.setattr(checkpoint, "_read_tokenizer", republish_after_the_first_read)
    loaded = load_model_dir(target)
    assert len(reads) == 2 and loaded.metadata == {"v": "B"}
    assert loaded.tokenizer is not None and loaded.tokenizer.to_str() == other_tokenizer.to_str()
    torch.testing.assert_close(loaded.model.tok_emb.weight, second.tok_emb.weight, atol=0, rtol=0)


def test_a_dir_republished_during_every_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmcore.checkpoint as checkpoint

    target = tmp_path / "live"
    save_model_dir(target, tiny_model())
    read_tokenizer = checkpoint._read_tokenizer

    def republish(path: Path, config: object) -> Tokenizer | None:
        save_model_dir(target, tiny_model())
        return read_tokenizer(path, config)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint, "_read_tokenizer", republish)
    with pytest.raises(CheckpointError, match="republished"):
        load_model_dir(target)


class _Payload:
    """Pickles as a call of Path.touch(marker): the marker exists afterwards only if something
    unpickled it, whatever the route (pickle.Unpickler, torch.serialization, a copy of either)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


def write_booby_trapped_pickle(path: Path, kind: str, marker: Path) -> None:
    """`zip`: what torch.save writes (a zip holding data.pkl); `raw`: a bare protocol-2 pickle
    (the PROTO opcode 0x80 first), as torch.save's legacy format and pickle.dump write."""
    if kind == "zip":
        torch.save(_Payload(marker), path)
        assert path.read_bytes()[:2] == b"PK"
    else:
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
        assert path.read_bytes()[:1] == b"\x80"


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_the_booby_trapped_pickle_goes_off_when_unpickled(tmp_path: Path, kind: str) -> None:
    # The tests below rely on its marker: it must appear when the file is unpickled.
    marker = tmp_path / "UNPICKLED"
    write_booby_trapped_pickle(tmp_path / "model.pt", kind, marker)
    assert not marker.exists()
    if kind == "zip":
        torch.load(tmp_path / "model.pt", weights_only=False)
    else:
        pickle.loads((tmp_path / "model.pt").read_bytes())
    assert marker.exists()


@pytest.fixture
def unpickle_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Calls of the usual unpickling entry points, recorded, so a loader that tried one and
    swallowed the error still shows. The payload's marker catches every route that runs the
    pickle; this also catches torch.load's weights_only unpickler, which refuses the payload."""
    calls: list[str] = []

    def refusing(name: str) -> Callable[..., None]:
        def refuse(*args: object, **kwargs: object) -> None:
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return refuse

    monkeypatch.setattr(torch, "load", refusing("torch.load"))
    monkeypatch.setattr(torch.serialization, "load", refusing("torch.serialization.load"))
    monkeypatch.setattr(pickle, "load", refusing("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refusing("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", refusing("pickle.Unpickler"))
    return calls


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_pickle_in_place_of_safetensors_is_refused_without_unpickling(
    tmp_path: Path, kind: str, unpickle_calls: list[str]
) -> None:
    marker = tmp_path / "UNPICKLED"
    save_model_dir(tmp_path / "m", tiny_model())
    write_booby_trapped_pickle(tmp_path / "m" / "model.safetensors", kind, marker)
    with pytest.raises(CheckpointError, match="not a safetensors file.*refusing to unpickle"):
        load_model_dir(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not a safetensors file.*refusing to unpickle"):
        load_model_dir(tmp_path / "m" / "model.safetensors")
    assert not marker.exists(), "the loader unpickled the file"
    assert unpickle_calls == []


def _header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize(("residue", "modulus"), [(0x80, 256), (0x4B50, 65536)],
                         ids=["starts-like-a-pickle", "starts-like-a-zip"])  # fmt: skip
def test_a_safetensors_file_whose_header_length_starts_like_a_pickle_or_zip_loads(
    tmp_path: Path, residue: int, modulus: int
) -> None:
    # The first 8 bytes are the header's length: 128 mod 256 puts 0x80 (pickle's PROTO) first,
    # 0x4B50 mod 65536 puts "PK" first. One file in 32 of those lmcore writes has the former.
    model = tiny_model()
    path = save_model_dir(tmp_path / "m", model) / "model.safetensors"
    tensors = load_file(path)
    save_file(tensors, path, metadata={"pad": ""})
    # Each metadata character adds one byte; safetensors then pads the header to a multiple of 8.
    near = (residue - _header_length(path)) % modulus
    for pad in range(max(near - 8, 0), near + 9):
        save_file(tensors, path, metadata={"pad": "x" * pad})
        if _header_length(path) % modulus == residue:
            break
    assert _header_length(path) % modulus == residue
    assert path.read_bytes()[:1] == b"\x80" or path.read_bytes()[:2] == b"PK"
    loaded = load_model_dir(tmp_path / "m").model
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_dir_with_only_a_pt_file_is_refused_naming_it(
    tmp_path: Path, kind: str, unpickle_calls: list[str]
) -> None:
    marker = tmp_path / "UNPICKLED"
    save_model_dir(tmp_path / "m", tiny_model())
    (tmp_path / "m" / "model.safetensors").unlink()
    write_booby_trapped_pickle(tmp_path / "m" / "model.pt", kind, marker)
    with pytest.raises(CheckpointError, match=r"model\.pt.*never unpickles"):
        load_model_dir(tmp_path / "m")
    with pytest.raises(CheckpointError, match="pickles"):
        load_model_dir(tmp_path / "m" / "model.pt")
    assert not marker.exists(), "the loader unpickled the file"
    assert unpickle_calls == []


def test_a_model_file_replaced_while_it_is_read_is_refused(tmp_path: Path) -> None:
    # Tensors are read one at a time, each through the path: another checkpoint renamed over
    # the file midway must not leave a model holding tensors of both.
    save_model_dir(tmp_path / "a", tiny_model(seed=0))
    save_model_dir(tmp_path / "b", tiny_model(seed=1))
    target = tmp_path / "a" / "model.safetensors"
    reads: list[str] = []

    def replace_after_the_first(name: str) -> None:
        reads.append(name)
        if len(reads) == 1:
            os.replace(tmp_path / "b" / "model.safetensors", target)

    model = Transformer.uninitialized(preset("tiny", block_size=32))
    with pytest.raises(CheckpointError, match="replaced or rewritten while it was being read"):
        load_model_file(model, target, loaded=replace_after_the_first)
    assert len(reads) == 1


def test_garbage_model_file_is_refused(tmp_path: Path) -> None:
    save_model_dir(tmp_path, tiny_model())
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model_dir(tmp_path)


def _tamper(path: Path, defect: str) -> str:
    """Rewrite model.safetensors with one defect; return the tensor name the error must name."""
    tensors = load_file(path)
    name = {"missing": "blocks.1.mlp.down.weight", "extra": "blocks.0.attn.extra_bias"}.get(
        defect, "norm.weight"
    )
    if defect == "shape":
        tensors[name] = torch.ones(3)
    elif defect == "dtype":
        tensors[name] = tensors[name].double()
    elif defect == "missing":
        del tensors[name]
    else:
        tensors[name] = torch.zeros(4)
    save_file(tensors, path)
    return name


@pytest.mark.parametrize(
    ("defect", "words"),
    [("shape", "has shape"), ("dtype", "has dtype"), ("missing", "missing"),
     ("extra", "unexpected")],
)
def test_mismatched_tensor_is_refused_naming_it(tmp_path: Path, defect: str, words: str) -> None:
    save_model_dir(tmp_path, tiny_model())
    name = _tamper(tmp_path / "model.safetensors", defect)
    with pytest.raises(CheckpointError) as err:
        load_model_dir(tmp_path)
    assert name in str(err.value) and words in str(err.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [({"vocab_size": 2**40}, "vocab_size"), ({"block_size": 2**33}, "block_size"),
     ({"n_layer": 3000}, "n_layer"), ({"n_embd": 128}, "n_embd"),
     ({"dtype": "bfloat16"}, "dtype"), ({"dtype": ["float32"]}, "dtype"),
     ({"format_version": True}, "format_version"), ({"mlp": "gelu"}, "mlp 'gelu'"),
     ({"bias": True}, "bias True"), ({"tie_embeddings": False}, "tie_embeddings False")],
)  # fmt: skip
def test_a_config_that_does_not_fit_the_weights_is_refused_before_any_allocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict[str, object], field: str
) -> None:
    save_model_dir(tmp_path, tiny_model())
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value in change.items():
        (config if key in config else config["model"])[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    built_on: list[str] = []
    build = Transformer.uninitialized

    def record(cfg: object, **kwargs: object) -> Transformer:
        built_on.append(str(kwargs.get("device", "cpu")))
        return build(cfg, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Transformer, "uninitialized", record)
    with pytest.raises(CheckpointError, match=field):
        load_model_dir(tmp_path)
    assert set(built_on) <= {"meta"}


@pytest.mark.parametrize("section", ["model", "top"])
def test_config_with_unknown_field_is_refused(tmp_path: Path, section: str) -> None:
    save_model_dir(tmp_path, tiny_model())
    config = json.loads((tmp_path / "config.json").read_text())
    target = config["model"] if section == "model" else config
    target["n_experts"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="n_experts"):
        load_model_dir(tmp_path)


# JSON files json.loads gets no further with than a JSONDecodeError does, but raises otherwise.
UNREADABLE_JSON = {
    "utf-16": '{"format_version": 1}'.encode("utf-16"),
    "nested-too-deep": b"[" * 100_000,
    "huge-integer": b'{"format_version": 1' + b"0" * 5000 + b"}",
}


def spoil(path: Path, how: str) -> None:
    """Put an UNREADABLE_JSON file, or a directory, in place of the file at `path`."""
    path.unlink()
    if how == "directory":
        path.mkdir()
    else:
        path.write_bytes(UNREADABLE_JSON[how])


@pytest.mark.parametrize("how", [*UNREADABLE_JSON, "directory"])
def test_an_unreadable_config_json_is_a_checkpoint_error_naming_it(
    tmp_path: Path, how: str
) -> None:
    """These escaped as UnicodeDecodeError, RecursionError, ValueError or IsADirectoryError,
    naming no file: the worker retried such a dir forever instead of exiting."""
    model_dir = save_model_dir(tmp_path / "m", tiny_model())
    spoil(model_dir / "config.json", how)
    with pytest.raises(CheckpointError, match=re.escape(str(model_dir / "config.json"))):
        load_model_dir(model_dir)


def test_a_model_file_that_is_a_directory_is_a_checkpoint_error_naming_it(tmp_path: Path) -> None:
    model_dir = save_model_dir(tmp_path / "m", tiny_model())
    spoil(model_dir / "model.safetensors", "directory")
    weights = model_dir / "model.safetensors"
    with pytest.raises(CheckpointError, match=re.escape(f"{weights}: is a directory")):
        load_model_dir(model_dir)


@pytest.mark.parametrize("content", ['{"model": 1}', "{nope", ""],
                         ids=["json", "not-json", "empty"])  # fmt: skip
def test_unreadable_tokenizer_file_is_refused_naming_it(
    tmp_path: Path, tokenizer: Tokenizer, content: str
) -> None:
    save_model_dir(tmp_path, tiny_model(), tokenizer)
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a tokenizer file"):
        load_model_dir(tmp_path)


def test_tokenizer_with_more_tokens_than_the_model_is_refused(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    assert tokenizer.vocab_size > 256
    save_model_dir(tmp_path, tiny_model(vocab_size=256), tokenizer)
    with pytest.raises(CheckpointError,
                       match=rf"{tokenizer.vocab_size} tokens, more than .* \(256\)"):  # fmt: skip
        load_model_dir(tmp_path)


@pytest.mark.gpu
def test_model_dir_loads_onto_cuda_in_bf16(tmp_path: Path) -> None:
    model = tiny_model()
    save_model_dir(tmp_path, model)
    loaded = load_model_dir(tmp_path, device="cuda", dtype=torch.bfloat16).model
    assert loaded.device.type == "cuda" and loaded.tok_emb.weight.dtype == torch.bfloat16
    assert loaded.head.weight is loaded.tok_emb.weight


@pytest.mark.gpu
def test_an_int8_load_onto_cuda_holds_the_int8_model_and_one_float_layer_at_most(
    tmp_path: Path,
) -> None:
    model = Transformer(preset("small", n_layer=24))  # fp32 4x int8, largest tensor 12.6 MB
    save_model_dir(tmp_path, model)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loaded = load_model_dir(tmp_path, device="cuda", quantized=True).model
    int8_bytes = torch.cuda.memory_allocated() - before
    largest_float = max(p.numel() * 4 for p in model.parameters())
    # The fp32 model (4x the int8 one) is never on the device, only one layer of it at a time.
    assert torch.cuda.max_memory_allocated() - before <= int8_bytes + 3 * largest_float
    want = quantize_int8(model).cuda().state_dict()
    for name, got in loaded.state_dict().items():
        assert got.device.type == "cuda", name
        torch.testing.assert_close(got, want[name], atol=0, rtol=0, msg=name)
