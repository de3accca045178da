"""lmcore.schedule: the LR curve, the time budget's pace, and a schedule carried across resumes."""

from __future__ import annotations

import json

import pytest

from lmcore.schedule import RunSchedule, lr_at, steps_on_course, total_steps
from lmcore.train import TrainConfig

pytestmark = pytest.mark.unit

BLOCK = 50
SETUP = {"batch_size": 4, "grad_accum_steps": 1, "world_size": 2, "device": "cpu",
         "precision": "fp32", "compile": False}


# -- the LR curve -------------------------------------------------------------------------------


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, max_steps=110)
    assert [lr_at(s, cfg, 110) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)  # the last warmup step reaches the peak
    assert lr_at(10, cfg, 110) < 1.0  # and only that one
    assert lr_at(59, cfg, 110) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(109, cfg, 110) == pytest.approx(0.1)  # the last step of 110 takes min_lr
    decay = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:99]))


def test_without_warmup_the_first_step_takes_the_peak_and_the_last_min_lr() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.1, max_steps=4)
    assert [lr_at(s, cfg, 4) for s in range(4)] == pytest.approx([1.0, 0.775, 0.325, 0.1])


def test_a_short_run_decays_to_min_lr_on_its_last_step() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, max_steps=4)
    assert [lr_at(s, cfg, 4) for s in range(4)] == pytest.approx([0.5, 1.0, 0.55, 0.1])


def test_a_warmup_as_long_as_the_run_is_cut_to_half_of_it_so_the_lr_still_decays() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=50, min_lr_ratio=0.1, max_steps=20)
    lrs = [lr_at(s, cfg, 20) for s in range(21)]
    assert lrs[:3] == pytest.approx([0.1, 0.2, 0.3])  # 10 warmup steps, not 50
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 9
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[19] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.1)
    # A warmup within half the run is the configured one.
    assert lr_at(0, TrainConfig(lr=1.0, warmup_steps=10), 20) == pytest.approx(0.1)


def test_a_time_budget_shortens_the_schedule_only_when_it_would_end_the_run_first() -> None:
    # 20 of 100 steps in 6 s of a 60 s budget: on course for all 100 (200 would fit).
    assert steps_on_course(100, 20, 6.0, 60.0) == 100
    assert steps_on_course(100, 20, 6.0, None) == 100
    # 20 steps in 24 s of 60: the budget allows 50, so the cosine is fitted to 50 steps.
    assert steps_on_course(100, 20, 24.0, 60.0) == pytest.approx(50.0)
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, max_steps=100, max_time_s=60)
    assert lr_at(29, cfg, 50.0) == pytest.approx(0.55)  # half way down the fitted cosine
    assert lr_at(49, cfg, 50.0) == pytest.approx(0.1)
    assert steps_on_course(100, 0, 0.0, 60.0) == 100  # nothing measured yet


def test_the_budget_pace_leaves_out_a_slow_first_step() -> None:
    # A first step of 20 s (compilation), then 100 steps of 0.1 s: the 30 s left of a 60 s
    # budget allow 300 more steps (401 in all), not the 202 that a pace with it would say.
    assert steps_on_course(1000, 101, 30.0, 60.0) == pytest.approx(202.0)
    assert steps_on_course(1000, 101, 30.0, 60.0, pace=(100, 10.0)) == pytest.approx(401.0)
    assert steps_on_course(1000, 1, 20.0, 60.0, pace=(0, 0.0)) == 1000  # nothing measured


def test_epochs_set_the_number_of_steps() -> None:
    cfg = TrainConfig(batch_size=4, grad_accum_steps=2, max_steps=None, epochs=1.5)
    # 1.5 x 10_000 tokens / (4 x 2 x 2 ranks x 50 tokens per step) = 18.75 -> 19 steps
    assert total_steps(cfg, 10_000, 50, world_size=2) == 19


def test_a_run_of_one_step_trains_at_the_peak_lr() -> None:
    assert lr_at(0, TrainConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.1, max_steps=1), 1) == 1.0


# -- a run's schedule across sessions -----------------------------------------------------------


def checkpointed(schedule: RunSchedule, step: int, elapsed_s: float) -> dict:
    """schedule's record as a resume reads it back from state.json."""
    return json.loads(json.dumps(schedule.record(step, elapsed_s)))


def test_resumed_schedule_continues_the_lr_of_the_first_session() -> None:
    """12 steps of 2 ranks' tokens, stopped at step 4 and resumed on one rank: each step then
    holds half the tokens, so the 8 steps left take 16, each at the LR of the tokens reached."""
    cfg = TrainConfig(batch_size=4, max_steps=None, epochs=1.0, warmup_steps=2, lr=1.0)
    train_tokens = 12 * 4 * 2 * BLOCK
    first = RunSchedule.start(cfg, train_tokens, BLOCK, 2, SETUP)
    assert first.steps == 12 and [first.lr(s, 12) for s in range(2)] == [0.5, 1.0]

    resumed = RunSchedule.start(cfg, train_tokens, BLOCK, 1, {**SETUP, "world_size": 1})
    resumed.resume(4, checkpointed(first, 4, 8.0))

    assert resumed.by_tokens and resumed.steps == 4 + 16
    assert resumed.tokens_at(resumed.steps) == train_tokens
    assert resumed.elapsed_before == 8.0
    for j in range(8):  # bit for bit: every other resumed step reaches a first-session step
        assert resumed.lr(4 + 2 * j, resumed.on_course(4, 8.0)) == first.lr(4 + j, 12)


def test_a_resume_with_more_epochs_and_another_world_size_trains_the_new_epochs() -> None:
    """Started for 1 epoch on 2 ranks, resumed at step 4 for 2 epochs on 1 rank: the budget is
    this run's 2 epochs, not the 12 steps the checkpoint's schedule was sized for."""
    first_cfg = TrainConfig(batch_size=4, max_steps=None, epochs=1.0, warmup_steps=2, lr=1.0)
    train_tokens = 12 * 4 * 2 * BLOCK
    first = RunSchedule.start(first_cfg, train_tokens, BLOCK, 2, SETUP)
    more = TrainConfig(batch_size=4, max_steps=None, epochs=2.0, warmup_steps=2, lr=1.0)
    resumed = RunSchedule.start(more, train_tokens, BLOCK, 1, {**SETUP, "world_size": 1})
    resumed.resume(4, checkpointed(first, 4, 8.0))
    # 1,600 tokens done; the 8,000 left take 40 steps of 200.
    assert resumed.steps == 4 + 40
    assert resumed.tokens_at(resumed.steps) == 2 * train_tokens


def test_a_checkpoint_record_keeps_the_keys_resumes_read() -> None:
    """state.json's extra holds these keys; checkpoints written before read the same way."""
    cfg = TrainConfig(batch_size=4, max_steps=10, max_time_s=60.0)
    record = checkpointed(RunSchedule.start(cfg, 10_000, BLOCK, 2, SETUP), 3, 4.5)
    assert record == {
        "elapsed_s": 4.5, "pace": [0, 0.0], "pace_setup": SETUP, "tokens_seen": 3 * 400,
        "schedule": {"total_steps": 10, "tokens_per_step": 400, "lr": cfg.lr,
                     "warmup_steps": cfg.warmup_steps, "min_lr_ratio": cfg.min_lr_ratio},
    }  # fmt: skip


def test_a_checkpoint_without_a_schedule_record_resumes_from_its_train_config() -> None:
    """Older checkpoints hold no tokens_seen: it comes from their train_config."""
    cfg = TrainConfig(batch_size=8, max_steps=None, epochs=1.0)
    resumed = RunSchedule.start(cfg, 12 * 400, BLOCK, 1, SETUP)
    resumed.resume(4, {"world_size": 2, "train_config": {"batch_size": 4}})
    assert resumed.tokens_before == 4 * 400 and resumed.elapsed_before == 0.0
    assert not resumed.by_tokens and resumed.steps == 12  # 400 tokens a step, as before


def test_a_resized_session_paces_its_budget_by_its_own_steps_once_it_has_timed_one() -> None:
    """Steps timed on 2 ranks say nothing about 1: they stand in only until this session has
    timed a step of its own past its first."""
    cfg = TrainConfig(max_steps=1000, max_time_s=100.0)
    first = RunSchedule.start(cfg, 10_000, BLOCK, 2, SETUP)
    first.on_course(1, 1.0)  # the first session's first step is left out of the pace
    assert first.on_course(11, 2.0) == pytest.approx(11 + 98 * 10)
    resumed = RunSchedule.start(cfg, 10_000, BLOCK, 1, {**SETUP, "world_size": 1})
    resumed.resume(11, checkpointed(first, 11, 2.0))
    assert resumed.pace(11, 2.0) == ((10, 1.0), SETUP)  # the old pace, until one of its own
    assert resumed.on_course(12, 5.0) == pytest.approx(12 + 95 * 10)
    assert resumed.pace(22, 15.0) == ((10, 10.0), {**SETUP, "world_size": 1})
    assert resumed.on_course(22, 15.0) == pytest.approx(22 + 85 * 1)
