"""When things happen in a run: its length in steps, the learning rate of each step, and what falls due
after a step (a report, a checkpoint, the end of an epoch). The one owner of the run's timetable."""

from __future__ import annotations

from dataclasses import dataclass

from configs.schema import ScheduleConfig
from trainer.schedule import learning_rate


@dataclass(frozen=True, slots=True)
class Due:
    """What the loop does after a step."""

    report: bool
    """Reduce and report the interval's metrics (where SIGTERM and divergence are acted on)."""
    checkpoint: bool
    """Save a checkpoint now: a mid-epoch interval checkpoint (an epoch's end saves after evaluating)."""
    end_of_epoch: bool
    """The step ends an epoch: evaluate, report and save next."""


@dataclass(frozen=True, slots=True)
class Cadence:
    """The run's timetable in optimiser steps (global steps, counted across restarts)."""

    schedule: ScheduleConfig
    """Epochs and the learning-rate schedule."""
    steps_per_epoch: int
    """Optimiser steps per epoch (batches per epoch / accumulation steps)."""
    accumulation_steps: int
    """Micro-batches per step."""
    peak_lr: float
    """The schedule's peak learning rate, scaled for the global batch."""
    log_interval_steps: int
    """A report every this many steps (and at every checkpoint and epoch end)."""
    checkpoint_interval_steps: int
    """A mid-epoch checkpoint every this many steps (0: only at epoch ends)."""

    @property
    def epochs(self) -> int:
        """Epochs of the schedule."""
        return self.schedule.epochs

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run."""
        return self.schedule.epochs * self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        """The epoch that step `step` (0-based, not yet taken) belongs to."""
        return step // self.steps_per_epoch

    def first_batch(self, step: int) -> int:
        """The batch of its epoch that step `step` starts at: where a resumed epoch picks up."""
        return (step % self.steps_per_epoch) * self.accumulation_steps

    def learning_rate(self, step: int) -> float:
        """The learning rate of step `step`."""
        return learning_rate(step, peak_lr=self.peak_lr, steps_per_epoch=self.steps_per_epoch, cfg=self.schedule)

    def reached_target(self, val: dict[str, float]) -> bool:
        """Whether evaluation scores `val` end the run early (schedule.target_top1)."""
        target = self.schedule.target_top1
        return target is not None and "val_top1" in val and val["val_top1"] >= target

    def after(self, step: int) -> Due:
        """What falls due once `step` steps are done."""
        end_of_epoch = step % self.steps_per_epoch == 0
        checkpoint = bool(self.checkpoint_interval_steps) and step % self.checkpoint_interval_steps == 0
        # Reports also come before every checkpoint: they are where skipped steps are cleaned up after.
        report = step % self.log_interval_steps == 0 or end_of_epoch or checkpoint
        return Due(report=report, checkpoint=checkpoint and not end_of_epoch, end_of_epoch=end_of_epoch)
