"""The trainer's checkpoints for resume: step dirs holding the model, optimizer, scaler and
what the trainer records, found, pruned and set aside by step.

Built on lmcore.checkpoint's safetensors and JSON IO: it must never unpickle, and never leave a
step dir that a resume would take for complete when it is not.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmcore.checkpoint import (
    FORMAT_VERSION,
    MODEL_FILE,
    CheckpointError,
    PathLike,
    load_model_file,
    model_tensors,
    publish_dir,
    read_json,
    read_safetensors,
    temp_sibling,
    unwrap_model,
    write_json,
)
from lmcore.durable import fsync_dir

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
EXTRA_TENSORS_FILE = "extra_tensors.safetensors"
COMPLETE_MARKER = "COMPLETE"
# A step dir is step-NNNNNNNN (step_dir); its temp and set-aside siblings share the prefix, and
# pruning and set_aside_training_states touch nothing else in a checkpoint dir.
STEP_DIR_PREFIX = "step-"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_OPTIMIZER_TENSOR = re.compile(r"(state|group)\.([0-9]+)\.(.+)")
_PARAM_INDEX = re.compile(r"[0-9]+")  # state_scalars' keys; \d would take other scripts' digits


@dataclass
class TrainingState:
    step: int
    extra: dict[str, Any]
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path = Path()


def _split_optimizer_state(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """optimizer.state_dict() -> (tensors "state.{i}.{key}" / "group.{g}.{key}", JSON rest)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = []
    for g, group in enumerate(sd["param_groups"]):
        plain = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):  # e.g. a tensor lr
                tensors[f"group.{g}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                plain[key] = value
        groups.append(plain)
    return tensors, {"param_groups": groups, "state_scalars": scalars}


def _join_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
    root: Path,
) -> dict[str, Any]:
    """The optimizer state_dict from a checkpoint's tensors and state.json's `optimizer`
    (checked by _read_state); CheckpointError naming the file for names that do not fit."""
    state: dict[int, dict[str, Any]] = {}
    current = optimizer.state_dict()["param_groups"]
    groups = [dict(g) for g in meta["param_groups"]]
    if len(groups) != len(current):
        raise CheckpointError(f"{root / STATE_FILE}: the optimizer has {len(current)} param "
                              f"groups, the checkpoint {len(groups)}")  # fmt: skip
    for name, tensor in tensors.items():
        # Written by _split_optimizer_state: "state.{param}.{key}" or "group.{group}.{key}".
        match = _OPTIMIZER_TENSOR.fullmatch(name)
        if match is None or (match[1] == "group" and int(match[2]) >= len(groups)):
            raise CheckpointError(f"{root / OPTIMIZER_FILE}: unexpected tensor {name!r} "
                                  f"(expected state.N.KEY or group.N.KEY, N < {len(groups)} "
                                  "for a group)")  # fmt: skip
        kind, idx, key = match[1], int(match[2]), match[3]
        if kind == "state":
            state.setdefault(idx, {})[key] = tensor
        else:
            groups[idx][key] = tensor
    for idx, values in meta["state_scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    _check_optimizer_state(optimizer, current, groups, state)
    for group, live in zip(groups, current):
        for key, value in group.items():
            # JSON turns tuples (AdamW betas) into lists; give them back their type.
            if isinstance(live.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
    return {"state": state, "param_groups": groups}


def _check_optimizer_state(
    optimizer: torch.optim.Optimizer,
    current: list[dict[str, Any]],
    groups: list[dict[str, Any]],
    state: dict[int, dict[str, Any]],
) -> None:
    """Refuse optimizer state that does not fit the parameters: load_state_dict takes any shape
    and casts any dtype, so a wrong one would fail only at the first step after resume."""
    params: dict[int, torch.Tensor] = {}
    for g, (saved, ids, live) in enumerate(zip(groups, current, optimizer.param_groups)):
        if len(saved.get("params", ())) != len(ids["params"]):
            raise CheckpointError(f"optimizer param group {g} has {len(ids['params'])} "
                                  f"parameters, checkpoint has {len(saved.get('params', ()))}")
        params.update(zip(ids["params"], live["params"]))
    for idx, values in state.items():
        if idx not in params:
            raise CheckpointError(f"{OPTIMIZER_FILE}: state for parameter {idx}, which the "
                                  f"optimizer does not have")  # fmt: skip
        param = params[idx]
        for key, value in values.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue  # scalars (a step count) have no parameter's shape
            if value.shape != param.shape or value.dtype != param.dtype:
                raise CheckpointError(
                    f"{OPTIMIZER_FILE}: state.{idx}.{key} is {value.dtype} "
                    f"{tuple(value.shape)}, its parameter {param.dtype} {tuple(param.shape)}")


SCHEDULED = ("lr", "initial_lr")  # set by the trainer every step, whatever was saved


def _keep_settings(optimizer: torch.optim.Optimizer, settings: list[dict[str, Any]],
                   root: Path) -> None:  # fmt: skip
    """Put the optimizer's own settings back after load_state_dict, which replaces them with the
    saved ones: the state (moments, step counts) is the checkpoint's, but weight decay, betas,
    eps (and the fused flag, which depends on the device) are this run's, as configured."""
    changed = set()
    for group, own in zip(optimizer.param_groups, settings):
        changed |= {k for k, v in own.items() if k not in SCHEDULED and group.get(k) != v}
        group.update(own)
    if changed:
        log.warning("%s: resuming with this run's optimizer settings for %s, not the checkpoint's",
                    root, ", ".join(sorted(changed)))  # fmt: skip


def step_dir(root: PathLike, step: int) -> Path:
    """The dir of the checkpoint at `step` under the checkpoint dir `root`."""
    return Path(root) / f"{STEP_DIR_PREFIX}{step:08d}"


def _checkpoint_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (name step-NNNNNNNN and a COMPLETE marker), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        match = _STEP_DIR.match(p.name)
        if match and p.is_dir() and (p / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), p))
    return sorted(found)


def _prune(ckpt_dir: Path, keep: int | None, current: Path) -> None:
    # One process (rank 0) writes a ckpt_dir, so any other temp dir is a crashed save's leftover.
    # Only step-* names: the trainer keeps its final model dir in the same ckpt_dir.
    for p in ckpt_dir.iterdir():
        leftover = p.name.startswith(STEP_DIR_PREFIX) and (".tmp-" in p.name or ".old-" in p.name)
        if leftover and p.is_dir() and p != current:
            shutil.rmtree(p, ignore_errors=True)
    if keep is None:
        return
    complete = _checkpoint_dirs(ckpt_dir)
    for _, p in complete[: max(0, len(complete) - keep)]:
        if p == current:
            continue
        # Out of view before any file goes: rmtree deletes in directory order, COMPLETE not
        # first, so a kill midway left a dir listed as complete that did not load. A kill
        # after the rename leaves an .old- leftover, which the next save sweeps (above).
        doomed = temp_sibling(p, "old")
        try:
            os.rename(p, doomed)
        except OSError:
            continue  # gone already (another pruner): nothing of it is left in view
        fsync_dir(ckpt_dir)
        shutil.rmtree(doomed, ignore_errors=True)


def save_training_state(
    ckpt_dir: PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    extra: dict[str, Any] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    keep: int | None = 3,
) -> Path:
    """Write ckpt_dir/step-{step:08d}/ (model, optimizer, scaler, extra JSON + tensors).

    Built in a temp dir, fsynced, marked COMPLETE, then renamed; keeps the newest `keep`
    checkpoints (None keeps all). Returns the checkpoint dir.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = step_dir(root, step)
    tmp = temp_sibling(target, "tmp")
    tmp.mkdir()
    try:
        save_file(model_tensors(unwrap_model(model)), tmp / MODEL_FILE)
        opt_tensors, opt_meta = _split_optimizer_state(optimizer)
        save_file(opt_tensors, tmp / OPTIMIZER_FILE)
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in (extra_tensors or {}).items()},
            tmp / EXTRA_TENSORS_FILE,
        )
        write_json(tmp / STATE_FILE, {
            "format_version": FORMAT_VERSION,
            "step": step,
            "optimizer": opt_meta,
            "scaler": scaler.state_dict() if scaler is not None else {},
            "extra": dict(extra or {}),
        })
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n", encoding="utf-8")
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep, target)
    return target


def latest_training_state(ckpt_dir: PathLike) -> Path | None:
    """The newest complete checkpoint under ckpt_dir; temp and unmarked dirs are never chosen."""
    found = _checkpoint_dirs(Path(ckpt_dir))
    return found[-1][1] if found else None


def list_training_states(ckpt_dir: PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for _, p in _checkpoint_dirs(Path(ckpt_dir))]


def read_training_extra(path: PathLike) -> dict[str, Any]:
    """A checkpoint's `extra` (what the trainer recorded in it), without reading any tensor."""
    return _read_state(Path(path)).get("extra") or {}


def _read_state(root: Path) -> dict[str, Any]:
    """A checkpoint's state.json, with the structure load_training_state relies on checked:
    CheckpointError naming the file, not a KeyError or TypeError naming nothing."""
    path = root / STATE_FILE
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):  # true == 1 in Python
        raise CheckpointError(f"{path}: unsupported format_version {version!r}")
    step = meta.get("step")
    if type(step) is not int or step < 0:  # bool is an int too
        raise CheckpointError(f"{path}: step must be an integer >= 0, got {step!r}")
    # The save names the dir after the same step, so a step that disagrees is damage. A step
    # past the run's total steps is not: that is a run that finished, and a resume trains none.
    named = _STEP_DIR.match(root.name)
    if named and int(named[1]) != step:
        raise CheckpointError(f"{path}: step {step}, but the checkpoint is {root.name}")
    if not _optimizer_meta_fits(meta.get("optimizer")):
        raise CheckpointError(f"{path}: optimizer must hold param_groups (a list of objects "
                              "with params) and state_scalars (an object of objects by "
                              "parameter index)")  # fmt: skip
    for key in ("scaler", "extra"):
        if not isinstance(meta.get(key) or {}, dict):
            raise CheckpointError(f"{path}: {key} must be a JSON object, got "
                                  f"{type(meta[key]).__name__}")  # fmt: skip
    return meta


def _optimizer_meta_fits(optimizer: Any) -> bool:
    """state.json's `optimizer` as _split_optimizer_state writes it: param_groups a list of
    objects with their params, state_scalars objects by parameter index."""
    if not isinstance(optimizer, dict):
        return False
    groups, scalars = optimizer.get("param_groups"), optimizer.get("state_scalars")
    return (isinstance(groups, list) and isinstance(scalars, dict)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
            and all(_PARAM_INDEX.fullmatch(k) and isinstance(v, dict)
                    for k, v in scalars.items()))  # fmt: skip


def set_aside_training_states(ckpt_dir: PathLike, stamp: str) -> Path | None:
    """Move every step-* dir of ckpt_dir (complete or not) into a new ckpt_dir/replaced-<stamp>*/.

    For a run that starts over where another left checkpoints: those would otherwise stay the
    newest, and pruning would remove the new run's first. Nothing is deleted; the dir name
    does not look like a checkpoint, so resuming and pruning never see inside it. Returns the
    new dir, or None when there was nothing to move.
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        return None
    old = sorted(p for p in root.iterdir() if p.name.startswith(STEP_DIR_PREFIX) and p.is_dir())
    if not old:
        return None
    aside = Path(tempfile.mkdtemp(prefix=f"replaced-{stamp}-", dir=root))
    aside.chmod(0o755)  # mkdtemp makes it private; checkpoints are shared (other pods)
    for p in old:
        os.rename(p, aside / p.name)
    fsync_dir(root)
    return aside


def load_training_state(
    path: PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    map_location: str | torch.device = "cpu",
) -> TrainingState:
    """Restore model (and optimizer, scaler) in place from a step dir, or the newest in a ckpt_dir.

    The optimizer moves its state onto its parameters' devices itself; extra_tensors are
    returned on `map_location`.
    """
    root = Path(path)
    # A checkpoint itself (one without its state.json too: that is named), else a ckpt_dir.
    own = (root / STATE_FILE, root / COMPLETE_MARKER)
    if not (_STEP_DIR.match(root.name) or any(p.exists() for p in own)):
        latest = latest_training_state(root)
        if latest is None:
            raise CheckpointError(f"{root}: no complete training checkpoint")
        root = latest
    if not (root / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{root}: checkpoint is incomplete (no {COMPLETE_MARKER} marker)")
    meta = _read_state(root)
    load_model_file(unwrap_model(model), root / MODEL_FILE)
    if optimizer is not None:
        opt_tensors = read_safetensors(root / OPTIMIZER_FILE)
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(
            _join_optimizer_state(optimizer, opt_tensors, meta["optimizer"], root))
        _keep_settings(optimizer, settings, root)
    if scaler is not None and meta.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(meta["scaler"])
    extra_tensors = read_safetensors(root / EXTRA_TENSORS_FILE, map_location)
    return TrainingState(meta["step"], meta.get("extra") or {}, extra_tensors, root)
