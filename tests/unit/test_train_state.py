"""Trainer checkpoints: exact resume, step dirs found, pruned and refused by name."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmcore.checkpoint import CheckpointError
from lmcore.model import Transformer
from lmcore.train_state import (
    latest_training_state,
    list_training_states,
    load_training_state,
    read_training_extra,
    save_training_state,
    step_dir,
)
from tests.unit.test_checkpoint import UNREADABLE_JSON, batch, spoil, tiny_model

pytestmark = pytest.mark.unit


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def train_steps(model: Transformer, opt: torch.optim.Optimizer, start: int, steps: int) -> None:
    model.train()
    for step in range(start, start + steps):
        tokens = batch(step, size=(2, 17))
        _, loss = model(tokens[:, :-1], tokens[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        assert loss is not None
        loss.backward()
        opt.step()


def test_resume_from_checkpoint_is_bit_identical_to_not_stopping(tmp_path: Path) -> None:
    # Dropout on, so the restored RNG state matters too.
    model = tiny_model(seed=0, dropout=0.1)
    opt = make_optimizer(model)
    train_steps(model, opt, 0, 3)
    path = save_training_state(
        tmp_path, 3, model=model, optimizer=opt,
        extra={"sampler": {"epoch": 0}}, extra_tensors={"rng_cpu": torch.get_rng_state()},
    )
    train_steps(model, opt, 3, 3)

    resumed = tiny_model(seed=123, dropout=0.1)
    resumed_opt = make_optimizer(resumed)
    state = load_training_state(path, model=resumed, optimizer=resumed_opt)
    torch.set_rng_state(state.extra_tensors["rng_cpu"])
    train_steps(resumed, resumed_opt, state.step, 3)

    assert state.step == 3 and state.extra == {"sampler": {"epoch": 0}}
    assert resumed_opt.param_groups[0]["betas"] == (0.9, 0.95)
    for (name, want), got in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=f"{name} differs")


def test_resume_keeps_the_optimizer_settings_of_this_run_and_the_state_of_the_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # load_state_dict alone would bring back the saved weight decay, betas and eps, so a
    # resume told train.weight_decay=0 would silently go on decaying.
    model = tiny_model()
    opt = make_optimizer(model)
    train_steps(model, opt, 0, 2)
    save_training_state(tmp_path, 2, model=model, optimizer=opt)
    resumed = tiny_model(seed=1)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-3, betas=(0.8, 0.99),
                                    weight_decay=0.0, eps=1e-6)  # fmt: skip
    with caplog.at_level("WARNING", logger="lmcore.train_state"):
        load_training_state(tmp_path, model=resumed, optimizer=resumed_opt)
    group = resumed_opt.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.8, 0.99), 0.0, 1e-6)
    assert "betas, eps, weight_decay" in caplog.text
    for saved, loaded in zip(opt.param_groups[0]["params"], group["params"]):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(resumed_opt.state[loaded][key], opt.state[saved][key],
                                       atol=0, rtol=0)  # fmt: skip


def test_training_state_restores_scaler_and_loads_into_wrapped_model(tmp_path: Path) -> None:
    model = tiny_model()
    opt = make_optimizer(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=7)
    save_training_state(tmp_path, 5, model=torch.nn.DataParallel(model), optimizer=opt,
                        scaler=scaler)
    fresh_scaler = torch.amp.GradScaler("cpu")
    fresh = tiny_model(seed=9)
    state = load_training_state(tmp_path, model=torch.compile(fresh), scaler=fresh_scaler)
    assert state.step == 5 and state.path.name == "step-00000005"
    assert fresh_scaler.get_scale() == 256.0
    assert fresh_scaler.get_growth_interval() == 7
    torch.testing.assert_close(fresh.tok_emb.weight, model.tok_emb.weight, atol=0, rtol=0)


def test_latest_training_state_ignores_half_written_dirs(tmp_path: Path) -> None:
    model = tiny_model()
    opt = make_optimizer(model)
    good = save_training_state(tmp_path, 2, model=model, optimizer=opt)
    # A crashed save (temp name) and a copied dir without the marker, both with higher steps.
    crashed = tmp_path / "step-00000009.tmp-4242-deadbeef"
    crashed.mkdir()
    (crashed / "state.json").write_text("{")
    unmarked = tmp_path / "step-00000010"
    unmarked.mkdir()
    for f in good.iterdir():
        if f.name != "COMPLETE":
            (unmarked / f.name).write_bytes(f.read_bytes())
    assert latest_training_state(tmp_path) == good
    with pytest.raises(CheckpointError, match="incomplete"):
        load_training_state(unmarked, model=model)
    assert load_training_state(tmp_path, model=model).step == 2


def test_step_dir_names_the_dir_a_save_writes_and_a_resume_finds(tmp_path: Path) -> None:
    # The trainer keeps its publish record (published.json) in step_dir: a save anywhere else
    # would hide the record, and a rerun would register the same weights again.
    model = tiny_model()
    saved = save_training_state(tmp_path, 7, model=model, optimizer=make_optimizer(model))
    assert saved == step_dir(tmp_path, 7) == latest_training_state(tmp_path)
    assert saved.name == "step-00000007"  # the name existing checkpoints carry


def test_latest_training_state_of_missing_dir_is_none(tmp_path: Path) -> None:
    assert latest_training_state(tmp_path / "nothing") is None


def test_keep_prunes_oldest_checkpoints_and_stale_temp_dirs(tmp_path: Path) -> None:
    model = tiny_model()
    opt = make_optimizer(model)
    (tmp_path / "step-00000001.tmp-1-abcdef12").mkdir()
    for step in (1, 2, 3, 4, 5):
        save_training_state(tmp_path, step, model=model, optimizer=opt, keep=2)
    assert [p.name for p in list_training_states(tmp_path)] == ["step-00000004", "step-00000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


def test_a_save_older_than_the_kept_ones_never_prunes_the_checkpoint_it_just_wrote(
    tmp_path: Path,
) -> None:
    # A run resumed from an earlier checkpoint with the newer ones still in the directory.
    model = tiny_model()
    opt = make_optimizer(model)
    for step in (10, 20, 30):
        save_training_state(tmp_path, step, model=model, optimizer=opt, keep=3)
    written = save_training_state(tmp_path, 5, model=model, optimizer=opt, keep=3)
    assert written.exists()
    assert load_training_state(written, model=tiny_model()).step == 5
    assert written in list_training_states(tmp_path)


# A save whose prune of step 1 is killed right after the first file of it is deleted (the
# kill comes inside shutil.rmtree, which deletes with os.unlink).
_KILLED_WHILE_PRUNING = """
import os, sys, torch
from lmcore.train_state import save_training_state
from lmcore.config import preset
from lmcore.model import Transformer
model = Transformer(preset("tiny", block_size=32))
opt = torch.optim.AdamW(model.parameters())
save_training_state(sys.argv[1], 1, model=model, optimizer=opt, keep=1)
unlink = os.unlink
def unlink_then_die(*args, **kwargs):
    unlink(*args, **kwargs)
    os._exit(137)
os.unlink = unlink_then_die
save_training_state(sys.argv[1], 2, model=model, optimizer=opt, keep=1)
"""


def test_a_kill_while_pruning_never_leaves_a_listed_checkpoint_that_does_not_load(
    tmp_path: Path,
) -> None:
    """rmtree of an old checkpoint deletes COMPLETE whenever directory order says: a kill
    midway left step 1 listed as complete without its other files, and it did not load."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    killed = subprocess.run([sys.executable, "-c", _KILLED_WHILE_PRUNING, str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 137, killed.stderr
    assert [p.name for p in list_training_states(tmp_path)] == ["step-00000002"]
    for path in list_training_states(tmp_path):
        assert load_training_state(path, model=tiny_model()).step == 2
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith("step-00000001.")]

    model = tiny_model()
    save_training_state(tmp_path, 3, model=model, optimizer=make_optimizer(model), keep=1)
    assert not leftover.exists()  # swept by the next save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]


def test_training_state_for_a_different_model_is_refused(tmp_path: Path) -> None:
    model = tiny_model()
    save_training_state(tmp_path, 1, model=model, optimizer=make_optimizer(model))
    other = tiny_model(n_embd=32)
    with pytest.raises(CheckpointError, match="tok_emb.weight"):
        load_training_state(tmp_path, model=other)


@pytest.mark.parametrize("how", [*UNREADABLE_JSON, "directory"])
def test_an_unreadable_state_json_is_a_checkpoint_error_naming_it(tmp_path: Path, how: str) -> None:
    model = tiny_model()
    path = save_training_state(tmp_path, 1, model=model, optimizer=make_optimizer(model))
    spoil(path / "state.json", how)
    with pytest.raises(CheckpointError, match=re.escape(str(path / "state.json"))):
        load_training_state(path, model=model)
    with pytest.raises(CheckpointError, match=re.escape(str(path / "state.json"))):
        read_training_extra(path)


def _drop(*keys: str) -> Callable[[dict], None]:
    """An edit of state.json that deletes state[keys[0]][keys[1]]..."""
    def edit(state: dict) -> None:
        for key in keys[:-1]:
            state = state[key]
        del state[keys[-1]]
    return edit


def _set(*keys: str, to: object) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        for key in keys[:-1]:
            state = state[key]
        state[keys[-1]] = to
    return edit


# Edits of a state.json that resumed with a bare KeyError, TypeError, AttributeError or
# ValueError naming no file, or (the steps) silently: step 10**12 published at once.
STATE_DEFECTS: dict[str, tuple[Callable[[dict], object], str]] = {
    "a-list": (lambda state: [state], "expected a JSON object, got list"),  # replaces it
    "no-step": (_drop("step"), "step must be an integer >= 0, got None"),
    "step-a-string": (_set("step", to="1"), "step must be an integer >= 0, got '1'"),
    "step-a-float": (_set("step", to=1.5), "step must be an integer >= 0, got 1.5"),
    "step-negative": (_set("step", to=-1), "step must be an integer >= 0, got -1"),
    "step-not-the-dirs": (_set("step", to=10**12),
                          "step 1000000000000, but the checkpoint is step-00000001"),
    "no-optimizer": (_drop("optimizer"), "optimizer must hold param_groups"),
    "optimizer-null": (_set("optimizer", to=None), "optimizer must hold param_groups"),
    "no-param-groups": (_drop("optimizer", "param_groups"), "optimizer must hold param_groups"),
    "state-scalars-a-list": (_set("optimizer", "state_scalars", to=[]),
                             "optimizer must hold param_groups"),
    "state-scalars-not-by-index": (_set("optimizer", "state_scalars", to={"x": {"step": 1}}),
                                   "optimizer must hold param_groups"),
    "extra-a-list": (_set("extra", to=[1]), "extra must be a JSON object, got list"),
}


def saved_after_one_step(tmp_path: Path) -> tuple[Transformer, Path]:
    """A tiny model and the checkpoint of its first step, optimizer moments included."""
    model = tiny_model()
    opt = make_optimizer(model)
    train_steps(model, opt, 0, 1)
    return model, save_training_state(tmp_path, 1, model=model, optimizer=opt)


@pytest.mark.parametrize("defect", STATE_DEFECTS)
def test_a_state_json_of_the_wrong_shape_is_refused_naming_the_file_and_field(
    tmp_path: Path, defect: str
) -> None:
    model, path = saved_after_one_step(tmp_path)
    edit, message = STATE_DEFECTS[defect]
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps(edit(state) or state))
    want = re.escape(f"{path / 'state.json'}: {message}")
    with pytest.raises(CheckpointError, match=want):
        load_training_state(path, model=model, optimizer=make_optimizer(model))
    with pytest.raises(CheckpointError, match=want):
        read_training_extra(path)  # what the trainer reads first


def test_a_step_past_any_schedule_loads_when_the_checkpoint_is_that_step(tmp_path: Path) -> None:
    """A run that finished: resuming trains no step. Only a step its dir disagrees with is
    refused."""
    model = tiny_model()
    path = save_training_state(tmp_path, 10**12, model=model, optimizer=make_optimizer(model))
    assert load_training_state(path, model=model).step == 10**12


@pytest.mark.parametrize("name", ["foo", "state.x.exp_avg", "zzz.0.exp_avg", "group.9.lr"])
def test_an_optimizer_tensor_of_an_unknown_name_is_refused_naming_the_file(
    tmp_path: Path, name: str
) -> None:
    """These raised ValueError (unpacking, int()) or IndexError, naming no file."""
    model, path = saved_after_one_step(tmp_path)
    tensors = load_file(path / "optimizer.safetensors")
    tensors[name] = tensors.pop("state.0.exp_avg")
    save_file(tensors, path / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(
            f"{path / 'optimizer.safetensors'}: unexpected tensor {name!r}")):  # fmt: skip
        load_training_state(path, model=model, optimizer=make_optimizer(model))


def test_a_checkpoint_without_its_state_json_is_refused_naming_it(tmp_path: Path) -> None:
    """It was taken for a checkpoint_dir and searched: "no complete training checkpoint"."""
    model = tiny_model()
    path = save_training_state(tmp_path, 1, model=model, optimizer=make_optimizer(model))
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{path / 'state.json'}: file not found")):
        load_training_state(path, model=model)


@pytest.mark.parametrize("defect", ["shape", "dtype", "parameter"])
def test_optimizer_state_that_does_not_fit_the_parameters_is_refused(
    tmp_path: Path, defect: str
) -> None:
    model, path = saved_after_one_step(tmp_path)
    tensors = load_file(path / "optimizer.safetensors")
    name = {"shape": "state.0.exp_avg", "dtype": "state.1.exp_avg_sq",
            "parameter": "state.99.exp_avg"}[defect]  # fmt: skip
    if defect == "shape":
        tensors[name] = torch.zeros(3)
    elif defect == "dtype":
        tensors[name] = tensors[name].double()
    else:
        tensors[name] = tensors["state.0.exp_avg"].clone()
    save_file(tensors, path / "optimizer.safetensors")
    resumed = tiny_model()
    with pytest.raises(CheckpointError, match=name.split(".")[1]):
        load_training_state(path, model=resumed, optimizer=make_optimizer(resumed))


@pytest.mark.gpu
def test_fused_adamw_state_on_cuda_round_trips_exactly(tmp_path: Path) -> None:
    # Same gradients set by hand (no backward, whose CUDA kernels may be nondeterministic).
    model = tiny_model().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    grads = [torch.randn_like(p) for p in model.parameters()]

    def step(m: Transformer, o: torch.optim.Optimizer) -> None:
        for p, g in zip(m.parameters(), grads):
            p.grad = g.clone()
        o.step()

    step(model, opt)
    save_training_state(tmp_path, 1, model=model, optimizer=opt)
    resumed = tiny_model(seed=7).cuda()
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2, fused=True)
    load_training_state(tmp_path, model=resumed, optimizer=resumed_opt)
    assert resumed_opt.state[next(resumed.parameters())]["step"].device.type == "cuda"
    step(model, opt)
    step(resumed, resumed_opt)
    for want, got in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
