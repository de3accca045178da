"""The learning-rate schedule of a training run: linear warmup, then cosine to min_lr over the
run's steps, fitted to its time budget and carried on across resumes.

Pure arithmetic on the train config and checkpoint records: it must not import torch or talk to
other ranks (each rank computes the same schedule from the same numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmcore.train import TrainConfig

MAX_WARMUP_SHARE = 0.5  # the warmup takes at most this share of the run's steps


def step_tokens(cfg: TrainConfig, block_size: int, world_size: int) -> int:
    """Tokens one optimizer step trains on: batch x accumulation x world size x block."""
    return cfg.batch_size * cfg.grad_accum_steps * world_size * block_size


def total_steps(cfg: TrainConfig, train_tokens: int, block_size: int, world_size: int) -> int:
    """Optimizer steps for the run: max_steps, or epochs x train tokens / tokens per step."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    assert cfg.epochs is not None
    per_step = step_tokens(cfg, block_size, world_size)
    return max(1, math.ceil(cfg.epochs * train_tokens / per_step))


def warmup_for(cfg: TrainConfig, steps: float) -> int:
    """The warmup of a run of `steps` steps: warmup_steps, but at most half the run.

    A warmup as long as the run (a short max_steps, or a budget that allows fewer steps than
    expected) would leave no room for the cosine, and the LR would never decay.
    """
    return min(cfg.warmup_steps, int(steps * MAX_WARMUP_SHARE))


def lr_at(step: int, cfg: TrainConfig, steps: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr.

    A pure function of the step and the run's length, so a resumed run continues the exact
    schedule. Under a time budget `steps` is steps_on_course(...). The warmup is warmup_for().
    """
    min_lr = cfg.lr * cfg.min_lr_ratio
    warmup = warmup_for(cfg, steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    # Steps run 0 .. steps-1: the last one takes min_lr. The cosine starts at the peak, which
    # the warmup's last step has taken already, so then it starts one step down the cosine.
    first, last = (warmup - 1 if warmup else 0), steps - 1
    if last <= first:
        return cfg.lr  # a run of one step: the peak
    if step >= last:
        return min_lr
    progress = (step - first) / max(1, last - first)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def steps_on_course(
    steps: int, done: int, elapsed_s: float, budget_s: float | None,
    pace: tuple[float, float] | None = None,
) -> float:
    """The run's length in steps: `steps`, or fewer where the time budget will end it first.

    At the pace measured so far (`pace`: that many steps in that many seconds; by default the
    `done` steps in `elapsed_s`), the budget's remaining seconds allow that many more steps.
    While the total is more than `steps` the schedule is the step count's alone (the same on
    every run); only a run that is running out of time has its decay brought forward.
    """
    measured_steps, measured_s = pace if pace is not None else (done, elapsed_s)
    if not budget_s or measured_steps <= 0 or measured_s <= 0:
        return float(steps)
    return min(float(steps), done + (budget_s - elapsed_s) * measured_steps / measured_s)


@dataclass
class RunSchedule:
    """One training session's place on its run's LR schedule, and the time budget's pace.

    The schedule's axis is the run's steps. An epochs run's length is a token budget: resumed
    with another batch or world size (tokens per step), it goes on along its first session's
    steps, by tokens. Made by `start`, moved on by `resume` from a checkpoint's `record`.
    """

    cfg: TrainConfig
    train_tokens: int
    block_size: int
    world_size: int
    setup: dict[str, Any]  # what this session's step time depends on, recorded with the pace
    steps: int  # the step this session trains to
    schedule_steps: int  # the schedule's length, in its own steps
    schedule_tokens_per_step: int
    # The time budget's pace: (steps, seconds) measured in earlier sessions and the setup they
    # were measured on, and where this session's measurement starts (after its first step).
    pace_before_setup: dict[str, Any]
    pace_before: tuple[float, float] = (0, 0.0)
    pace_from: tuple[int, float] | None = None
    start_step: int = 0  # the step this session starts from
    tokens_before: int = 0  # tokens trained before start_step
    by_tokens: bool = False  # this session's steps sit on the schedule by their tokens
    elapsed_before: float = 0.0  # loop seconds of the sessions this one resumed

    @classmethod
    def start(cls, cfg: TrainConfig, train_tokens: int, block_size: int, world_size: int,
              setup: dict[str, Any]) -> RunSchedule:  # fmt: skip
        """The schedule of a run's first session (`resume` carries on an earlier one's)."""
        steps = total_steps(cfg, train_tokens, block_size, world_size)
        per_step = step_tokens(cfg, block_size, world_size)
        return cls(cfg, train_tokens, block_size, world_size, setup, steps=steps,
                   schedule_steps=steps, schedule_tokens_per_step=per_step,
                   pace_before_setup=setup)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one of this session's steps (step_tokens)."""
        return step_tokens(self.cfg, self.block_size, self.world_size)

    def resume(self, step: int, extra: Mapping[str, Any]) -> None:
        """Carry on from the checkpoint at `step` whose extra holds `record`'s keys: its time,
        pace and token count and, for an epochs run, its schedule's axis (the first session's
        tokens per step) with this run's epochs as the budget. An older checkpoint may lack
        some: its train_config stands in, or this session's values."""
        self.elapsed_before = float(extra.get("elapsed_s", 0.0))
        pace, setup = extra.get("pace"), extra.get("pace_setup")
        if isinstance(pace, list) and len(pace) == 2:
            self.pace_before = (float(pace[0]), float(pace[1]))
            if isinstance(setup, dict):  # not recorded before: taken as this session's
                self.pace_before_setup = setup
        before = extra.get("train_config") or {}
        old_tokens_per_step = (  # recorded since the schedule kept it; else from the old config
            int(before.get("batch_size", self.cfg.batch_size))
            * int(before.get("grad_accum_steps", self.cfg.grad_accum_steps))
            * int(extra.get("world_size") or self.world_size)
            * self.block_size
        )
        schedule = extra.get("schedule") or {}
        self.start_step = step
        self.tokens_before = int(extra.get("tokens_seen", step * old_tokens_per_step))
        if self.cfg.epochs is None:
            return  # max_steps: the schedule is in steps, whatever a step holds
        self.schedule_tokens_per_step = int(schedule.get("tokens_per_step", old_tokens_per_step))
        # The budget is this run's epochs, in steps of the schedule's size: the checkpoint's
        # total_steps would hold a resized run to the epochs it was started with.
        self.schedule_steps = max(1, math.ceil(
            self.cfg.epochs * self.train_tokens / self.schedule_tokens_per_step))
        budget = self.schedule_steps * self.schedule_tokens_per_step
        # By tokens whenever any session's steps were not the schedule's size (this one's, or an
        # earlier one's: a run back at its first size still has another's tokens behind it).
        self.by_tokens = (self.tokens_per_step != self.schedule_tokens_per_step
                          or self.tokens_before != step * self.schedule_tokens_per_step)
        if self.by_tokens:
            left = max(0, budget - self.tokens_before)
            self.steps = step + math.ceil(left / self.tokens_per_step)

    def record(self, step: int, elapsed_s: float) -> dict[str, Any]:
        """What a checkpoint at `step`, `elapsed_s` loop seconds in, keeps for `resume` (keys of
        its extra)."""
        pace, pace_setup = self.pace(step, elapsed_s)
        return {
            "elapsed_s": elapsed_s,
            "pace": list(pace),
            "pace_setup": pace_setup,  # what the pace's steps ran on
            "tokens_seen": int(self.tokens_at(step)),
            "schedule": {"total_steps": self.schedule_steps,
                         "tokens_per_step": self.schedule_tokens_per_step,
                         "lr": self.cfg.lr,
                         "warmup_steps": self.cfg.warmup_steps,
                         "min_lr_ratio": self.cfg.min_lr_ratio},
        }

    def tokens_at(self, steps_done: float) -> float:
        """Tokens the run has trained once this session is at `steps_done`."""
        return self.tokens_before + (steps_done - self.start_step) * self.tokens_per_step

    def position(self, steps_done: float) -> float:
        """Where `steps_done` steps of this run sit on the schedule's axis (its own steps, but
        for an epochs run resumed with another tokens per step: the first session's)."""
        if not self.by_tokens:
            return steps_done
        return self.tokens_at(steps_done) / self.schedule_tokens_per_step

    def on_course(self, done: int, elapsed_s: float) -> float:
        """The run's length in steps once `done` steps took `elapsed_s` seconds: this session's
        steps, or fewer where the time budget ends it first (steps_on_course at `pace`).

        The pace leaves the session's first step out: its own measurement starts at the first
        call past that step.
        """
        if done == self.start_step + 1 and self.pace_from is None:
            self.pace_from = (done, elapsed_s)
        pace = self.pace(done, elapsed_s)[0]
        return steps_on_course(self.steps, done, elapsed_s, self.cfg.max_time_s, pace)

    def lr(self, step: int, on_course: float) -> float:
        """Learning rate of optimizer step `step` (0-based) of a run `on_course` steps long."""
        return lr_at(self.position(step), self.cfg, self.position(on_course))

    def pace(self, done: int, elapsed_s: float) -> tuple[tuple[float, float], dict[str, Any]]:
        """(steps, seconds) of training measured so far, each session's first step left out,
        and the setup those steps ran on.

        Earlier sessions' steps count only where they ran on this session's setup. Otherwise
        (resized, say, from 4 ranks to 1 with 4x the accumulation) they stand in only until
        this session has timed a step of its own: counted on, steps that took a quarter of the
        time kept the LR high for most of the session and crammed the decay into its end.
        """
        own_steps, own_s = 0, 0.0
        if self.pace_from is not None:
            own_steps, own_s = done - self.pace_from[0], elapsed_s - self.pace_from[1]
        (steps, seconds), setup = self.pace_before, self.setup
        if self.pace_before_setup == setup:
            return (steps + own_steps, seconds + own_s), setup
        if own_steps > 0 and own_s > 0:
            return (own_steps, own_s), setup
        return self.pace_before, self.pace_before_setup
