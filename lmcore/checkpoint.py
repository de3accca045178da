"""Model dirs (config.json + model.safetensors + tokenizer.json), and the safe file IO they share
with the trainer's checkpoints (lmcore.train_state).

Safetensors and JSON only: it must never unpickle (no torch.load), and never leave a half-written
directory where a reader would take it for a complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lmcore.config import ConfigError, ModelConfig
from lmcore.durable import fsync_dir, fsync_file
from lmcore.inference_layout import ShapeChoice, use_inference_layout
# One spelling for model dirs and MLflow logged models, in a module that needs no torch.
from lmcore.mlflow_client import MODEL_CONFIG_FILE as CONFIG_FILE
from lmcore.mlflow_client import MODEL_WEIGHTS_FILE as MODEL_FILE
from lmcore.model import Transformer
from lmcore.quantize import Int8Linear, TiedInt8Embedding, quantize_as_loaded
from lmcore.tokenizer import TOKENIZER_FILE, Tokenizer

FORMAT_VERSION = 1
MODEL_DIR_FILES = (CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE)  # what save_model_dir writes
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
_CONFIG_KEYS = {"format_version", "model", "dtype", "metadata"}
_FLOAT_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

PathLike = str | os.PathLike[str]


class CheckpointError(ValueError):
    """A model dir or trainer checkpoint is missing, malformed, or does not fit the model."""


# -- wrapped models and tensor dicts ------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP / DataParallel (`module.`) and torch.compile (`_orig_mod.`)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _aliases(module: nn.Module) -> dict[str, str]:
    """Tied tensors: {alias name: first name} (e.g. head.weight -> tok_emb.weight)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = list(module.named_parameters(remove_duplicate=False))
    named += list(module.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def model_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each tied tensor once, as contiguous CPU tensors (what safetensors takes)."""
    aliases = _aliases(module)
    state = module.state_dict()
    return {
        name: t.detach().to("cpu").contiguous()
        for name, t in state.items()
        if not (name in aliases and aliases[name] in state)
    }


def _expected_tensors(module: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    state = module.state_dict()
    aliases = _aliases(module)
    return {
        name: (tuple(t.shape), t.dtype)
        for name, t in state.items()
        if not (name in aliases and aliases[name] in state)
    }


def _check_tensors(
    found: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    source: Path,
) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s): {', '.join(missing)}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s): {', '.join(unexpected)}")
    for name, (shape, dtype) in expected.items():
        tensor = found[name]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {shape}"
            )
        if tensor.dtype != dtype:
            raise CheckpointError(
                f"{source}: tensor {name} has dtype {tensor.dtype}, expected {dtype}"
            )


def load_model_file(
    module: nn.Module,
    path: Path,
    *,
    stored_dtype: torch.dtype | None = None,
    loaded: Callable[[str], None] | None = None,
) -> None:
    """Check every tensor of a model file against the module, then copy them in one at a time.

    Each tensor is read through a mapping of its own, closed before the next, so a load peaks at
    the model plus its largest tensor rather than the model plus the whole file (mapped pages
    count until the mapping closes). A module on a GPU takes each tensor from its mapping
    straight to the device. Tied aliases are not in the file: their first name fills both.
    `stored_dtype`: the file's floating dtype where the module's differs (the copy casts).
    `loaded` is called with each name once its tensor is in (lmcore.quantize.quantize_as_loaded).
    """
    expected = _expected_tensors(module)
    if stored_dtype is not None:
        expected = {name: (shape, stored_dtype if dtype.is_floating_point else dtype)
                    for name, (shape, dtype) in expected.items()}  # fmt: skip
    with _opened_safetensors(path) as f:
        first_seen = _identity(path)
        # get_tensor maps without reading: checking shapes and dtypes touches no data.
        _check_tensors({name: f.get_tensor(name) for name in f.keys()}, expected, path)
    targets = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in expected:
            with _opened_safetensors(path, sniffed=True) as f:
                targets.pop(name).copy_(f.get_tensor(name))  # no reference kept past `loaded`
                # Each tensor opens the path again: a file replaced or rewritten meanwhile
                # would mix two checkpoints' tensors without this check.
                if _identity(path) != first_seen:
                    raise CheckpointError(f"{path}: replaced or rewritten while it was being "
                                          "read; load it again")  # fmt: skip
            if loaded is not None:
                loaded(name)


def _identity(path: Path) -> tuple[int, ...]:
    """What changes when a file is replaced (a new inode) or rewritten in place (size, mtime)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _dir_identity(path: Path) -> tuple[int, ...] | None:
    """`_identity` of a dir, None while it is gone (a republish moves the old one aside first)."""
    try:
        return _identity(path)
    except FileNotFoundError:
        return None


# -- safe file IO -------------------------------------------------------------------------------


def _sniff_safetensors(path: Path) -> None:
    """Refuse pickles and other non-safetensors files before any parser sees them."""
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: {path.suffix} files are pickles; lmcore only reads safetensors"
        )
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a file") from None
    # A safetensors file is its JSON header's length (8 bytes, little-endian) and then the
    # header. Those 8 bytes can start like a pickle (0x80 when the length is 128 mod 256) or a
    # zip ("PK"), so the safetensors shape is tested first; the safetensors parser never unpickles.
    header_len = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
    if 0 < header_len <= path.stat().st_size - 8 and head[8:9] == b"{":
        return
    # torch.save writes a zip (PK\x03\x04); a raw pickle starts with PROTO (0x80) and 2 to 5.
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
        raise CheckpointError(
            f"{path}: not a safetensors file (looks like a torch.save pickle); "
            "refusing to unpickle it, convert it to safetensors"
        )
    raise CheckpointError(f"{path}: not a safetensors file (bad header)")


@contextmanager
def _opened_safetensors(path: Path, *, sniffed: bool = False) -> Iterator[Any]:
    """safetensors' lazy reader of `path` (a pickle or other file refused first, unless the
    caller already did)."""
    if not sniffed:
        _sniff_safetensors(path)
    try:
        reader = safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file: {exc}") from exc
    with reader:
        yield reader


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a file at once, on `device` (optimizer state, extra tensors)."""
    with _opened_safetensors(path) as f:
        return {name: f.get_tensor(name).to(device) for name in f.keys()}


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON (NaN allowed); ValueError naming the file for what JSON cannot
    hold."""
    try:
        text = json.dumps(data, indent=2, sort_keys=False, allow_nan=True)
    except TypeError as exc:
        raise ValueError(f"{path.name}: value is not JSON-serialisable: {exc}") from exc
    path.write_text(text + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    """A JSON file; CheckpointError naming it for anything that keeps it from being read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a file") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON: {exc}") from exc
    # Not UTF-8 (UnicodeDecodeError), an integer over Python's digit limit (ValueError), nested
    # too deep (RecursionError): named too, so the worker knows no retry reads it.
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a JSON file lmcore can read: {exc}") from exc


def temp_sibling(target: Path, tag: str) -> Path:
    """A new name beside `target` (NAME.TAG-PID-RANDOM) for a dir being built or set aside."""
    return target.with_name(f"{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def publish_dir(tmp: Path, target: Path) -> None:
    """fsync tmp's files, then rename it to target; an existing target is moved aside first.

    Linux cannot swap two directories atomically, so a reader may briefly find no target,
    but it never finds a partial one.
    """
    for p in tmp.iterdir():
        fsync_file(p)
    fsync_dir(tmp)
    old = None
    if target.exists():
        old = temp_sibling(target, "old")
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- model dir ----------------------------------------------------------------------------------


def check_replaceable(path: PathLike) -> None:
    """FileExistsError unless saving a model dir at `path` deletes at most a model dir lmcore
    wrote: the save replaces the whole dir, whatever it holds. Absent and empty dirs pass."""
    target = Path(path)
    why = _not_a_model_dir(target)
    if why:
        raise FileExistsError(f"{target}: exists and is not a model dir ({why}); saving a model "
                              "there would delete it whole. Name a new or empty dir, or move "
                              "this one away first")  # fmt: skip


def _not_a_model_dir(target: Path) -> str | None:
    """Why `target` is not a model dir save_model_dir wrote (a folder of models, a checkpoint
    dir, a home dir, another tool's model), or None when it is one, empty or absent."""
    if not target.exists():
        return None
    if not target.is_dir():
        return "it is not a directory"
    entries = list(target.iterdir())
    if not entries:
        return None
    # Only the files a save writes: anything else was put there by someone, and would be lost.
    others = sorted(p.name for p in entries if p.name not in MODEL_DIR_FILES or not p.is_file())
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        return f"it holds {', '.join(others[:3])}{more}"
    if not (target / CONFIG_FILE).is_file():
        return f"it has no {CONFIG_FILE}"
    # A config.json of lmcore's own keys: another tool's model dir has the same file names.
    try:
        raw = read_json(target / CONFIG_FILE)
    except CheckpointError:
        return f"its {CONFIG_FILE} is unreadable"
    if not (isinstance(raw, dict) and {"format_version", "model"} <= set(raw) <= _CONFIG_KEYS):
        return f"its {CONFIG_FILE} is not an lmcore model config"
    return None


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer | None
    config: ModelConfig
    metadata: dict[str, Any]
    path: Path
    layout: list[ShapeChoice] = field(default_factory=list)  # per weight shape, as measured


def _floating_dtype(module: nn.Module) -> torch.dtype:
    dtypes = {t.dtype for t in module.state_dict().values() if t.is_floating_point()}
    if len(dtypes) > 1:
        raise ValueError(f"model mixes floating dtypes {sorted(map(str, dtypes))}; cast it first")
    return dtypes.pop() if dtypes else torch.float32


def save_model_dir(
    path: PathLike,
    model: nn.Module,
    tokenizer: Tokenizer | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write config.json, model.safetensors (tied weights once) and tokenizer.json atomically.

    The model's dtype is kept (save a bf16 copy for serving by casting it first). A model dir
    already at `path` is replaced; anything else there is refused (check_replaceable).
    Returns the dir.
    """
    module = unwrap_model(model)
    if not isinstance(module, Transformer):
        raise TypeError(f"save_model_dir needs an lmcore Transformer, got {type(module).__name__}")
    # Its int8 tensors and scales fit no model config.json can describe: the dir would not load.
    if any(isinstance(m, (Int8Linear, TiedInt8Embedding)) for m in module.modules()):
        raise ValueError("save_model_dir writes full-precision models only, and this one is "
                         "quantized: save the model before quantize_int8 and load it with "
                         "quantized=True")  # fmt: skip
    target = Path(path)
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    dtype_name = str(_floating_dtype(module)).removeprefix("torch.")
    config = {
        "format_version": FORMAT_VERSION,
        "model": module.config.to_dict(),
        "dtype": dtype_name,
        "metadata": dict(metadata or {}),
    }
    tmp = temp_sibling(target, "tmp")
    tmp.mkdir()
    try:
        write_json(tmp / CONFIG_FILE, config)
        save_file(model_tensors(module), tmp / MODEL_FILE, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _read_model_config(path: Path) -> tuple[ModelConfig, torch.dtype, dict[str, Any]]:
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    unknown = sorted(set(raw) - _CONFIG_KEYS)
    if unknown:
        raise CheckpointError(f"{path}: unknown field(s): {', '.join(unknown)}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):  # true == 1 in Python
        raise CheckpointError(
            f"{path}: format_version {version!r} not supported (this lmcore reads {FORMAT_VERSION})"
        )
    if not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{path}: missing the 'model' section")
    try:
        config = ModelConfig.from_dict(raw["model"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad model config: {exc}") from exc
    dtype_name = raw.get("dtype", "float32")
    if not isinstance(dtype_name, str) or dtype_name not in _FLOAT_DTYPES:
        raise CheckpointError(f"{path}: dtype must be one of {sorted(_FLOAT_DTYPES)}, "
                              f"got {dtype_name!r}")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: metadata must be a JSON object")
    return config, _FLOAT_DTYPES[dtype_name], metadata


def _check_config_fits_file(
    config_path: Path, model_path: Path, config: ModelConfig, dtype: torch.dtype
) -> None:
    """Refuse a config.json that does not describe the tensors of model.safetensors before the
    model is allocated: a wrong vocab_size or n_layer would build a model of that size first
    (vocab_size 2**40: 281 TB). The fields the header shows are named; everything else is
    compared with the model built on the meta device, which allocates nothing."""
    with _opened_safetensors(model_path) as f:
        # get_tensor maps without reading: checking shapes and dtypes touches no data.
        found = {name: f.get_tensor(name) for name in f.keys()}
        for field_name, value, makes, holds in _fields_shown(config, dtype, found):
            if makes != holds:
                raise CheckpointError(f"{config_path}: {field_name} {value!r} makes {makes}, but "
                                      f"{model_path.name} has {holds}")  # fmt: skip
        meta = Transformer.uninitialized(config, device="meta", dtype=dtype)
        _check_tensors(found, _expected_tensors(meta), model_path)


def _fields_shown(
    config: ModelConfig, dtype: torch.dtype, found: Mapping[str, torch.Tensor]
) -> list[tuple[str, Any, str, str]]:
    """(field, its value, what it makes, what the file has) for each config field a model
    file's tensor names and shapes show."""

    def tensor(name: str, present: bool) -> str:
        return f"{'a' if present else 'no'} {name}"

    layers = {int(m.group(1)) for n in found if (m := re.match(r"blocks\.(\d+)\.", n))}
    head, gate, bias = "head.weight", "blocks.0.mlp.gate.weight", "blocks.0.attn.qkv.bias"
    tied = config.tie_embeddings
    shown = [
        ("n_layer", config.n_layer, f"{config.n_layer} blocks",
         f"{max(layers) + 1 if layers else 0} blocks"),
        ("tie_embeddings", tied, tensor(head, not tied), tensor(head, head in found)),
    ]  # fmt: skip
    if 0 in layers:
        shown += [
            ("mlp", config.mlp, tensor(gate, config.mlp == "swiglu"), tensor(gate, gate in found)),
            ("bias", config.bias, tensor(bias, config.bias), tensor(bias, bias in found)),
        ]
    emb, pos = found.get("tok_emb.weight"), found.get("pos_emb.weight")
    if emb is not None and emb.dim() == 2:
        shown += [
            ("vocab_size", config.vocab_size, f"{config.padded_vocab_size} embedding rows",
             f"{emb.shape[0]} embedding rows"),
            ("n_embd", config.n_embd, f"width {config.n_embd}", f"width {emb.shape[1]}"),
            ("dtype", str(dtype).removeprefix("torch."), f"{dtype} tensors",
             f"{emb.dtype} tensors"),
        ]  # fmt: skip
    if pos is not None and pos.dim() == 2:
        shown.append(("block_size", config.block_size, f"{config.block_size} positions",
                      f"{pos.shape[0]} positions"))  # fmt: skip
    return shown


def _model_dir(path: PathLike) -> Path:
    p = Path(path)
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{p}: {p.suffix} files are pickles; lmcore only reads "
                                  "safetensors model dirs")
        if p.name in (CONFIG_FILE, MODEL_FILE):
            return p.parent
        raise CheckpointError(f"{p}: expected a model directory")
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such model directory")
    if not (p / MODEL_FILE).exists():
        pickles = sorted(q.name for q in p.iterdir() if q.suffix in PICKLE_SUFFIXES)
        hint = f"; found {', '.join(pickles)}, which lmcore never unpickles" if pickles else ""
        raise CheckpointError(f"{p}: no {MODEL_FILE}{hint}")
    return p


def load_model_dir(
    path: PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    quantized: bool = False,
    layout: Sequence[ShapeChoice] | None = None,
) -> LoadedModel:
    """Build the Transformer from config.json, check and load every tensor, return it in eval().

    `dtype` casts the weights (the saved dtype by default); `quantized` then swaps the linears
    for int8 ones (lmcore.quantize.quantize_int8). The model comes laid out for inference in
    that final form: each linear's weight order and one-row kernel are the fastest measured on
    this machine (lmcore.inference_layout: for the `small` and `gpt2-124m` presets 0.4 and 1.0 s
    in fp32, 0.2 and 1.8 s in bf16, 0.3 and 2.2 s in int8, of whole loads of 0.4 and 2.5, 0.3
    and 2.1, 0.4 and 3.6 s on one Zen 4 core). `layout`, an earlier model's
    `LoadedModel.layout` from this process, is applied instead of measuring again when it
    covers the same linears.
    """
    root = _model_dir(path)
    # Config, tokenizer and weights are read one after another: a dir republished (renamed
    # over) meanwhile would pair one model's config and tokenizer with another's weights, so
    # a read that saw the dir change is dropped and made again, once.
    for _ in range(2):
        seen = _dir_identity(root)
        got = _read_model_dir(root, device, dtype, quantized)
        if _dir_identity(root) == seen:
            break
        got = None  # not held while the next read builds its model
    else:
        raise CheckpointError(f"{root}: republished twice while it was being read; load it again")
    model, tokenizer, config, metadata = got
    # A loaded model serves; training resumes from trainer checkpoints, elsewhere.
    choices = use_inference_layout(model, reuse=layout)
    return LoadedModel(model, tokenizer, config, metadata, root, choices)


def _read_model_dir(
    root: Path, device: str | torch.device, dtype: torch.dtype | None, quantized: bool
) -> tuple[Transformer, Tokenizer | None, ModelConfig, dict[str, Any]]:
    """`load_model_dir`'s reads: the model (in eval()), tokenizer, config and metadata."""
    config, saved_dtype, metadata = _read_model_config(root / CONFIG_FILE)
    tokenizer = _read_tokenizer(root / TOKENIZER_FILE, config)
    _check_config_fits_file(root / CONFIG_FILE, root / MODEL_FILE, config, saved_dtype)
    # Built on the device, in the dtype it serves in, without a random init: every tensor from
    # the file replaces it, cast as it is copied, so no second full copy in the saved dtype.
    # int8: each linear is quantized as soon as its tensors are in, so the full-precision
    # model is never resident whole. On a GPU that needs the model built on the host, where
    # unwritten pages cost nothing, each linear reaching the device just before it is quantized.
    build_on = "cpu" if quantized else device
    model = Transformer.uninitialized(config, device=build_on, dtype=dtype or saved_dtype)
    loaded = quantize_as_loaded(model, device=device) if quantized else None
    load_model_file(model, root / MODEL_FILE, stored_dtype=saved_dtype, loaded=loaded)
    model.to(device).eval()  # what is not quantized (norms, the position table) follows
    return model, tokenizer, config, metadata


def _read_tokenizer(path: Path, config: ModelConfig) -> Tokenizer | None:
    """The dir's tokenizer.json, if it has one, and only if its ids fit the model."""
    if not path.exists():
        return None
    try:
        tokenizer = Tokenizer.load(path)
    except Exception as exc:  # HF tokenizers raises a bare Exception for a malformed file
        raise CheckpointError(f"{path}: not a tokenizer file lmcore can read: {exc}") from exc
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size ({config.vocab_size}): its ids would fall outside the embedding")
    return tokenizer
