"""What one reporting interval measured: device-side sums per step, one reduction over ranks per report.

The meter also owns the two facts that outlive a report: the streak of consecutive non-finite losses (kept
on the device, so a step needs no host sync) and the BatchNorm statistics at the interval's start, which a
report with a skipped step rolls back to.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from trainer.dist import all_reduce_max, all_reduce_sum
from trainer.preempt import PreemptionFlag, StopVote


class TrainingDiverged(RuntimeError):
    """Training produced only non-finite losses for too long; it stopped rather than save NaN weights."""


@dataclass(frozen=True, slots=True)
class IntervalReport:
    """One interval since the last report, over every rank."""

    loss: float
    """Mean of the finite losses (NaN when there was none)."""
    images: int
    """Images trained on by all ranks together."""
    nonfinite_losses: int
    """Steps whose loss was not finite (skipped by the optimizer), summed over ranks."""
    longest_nonfinite_streak: int
    """The longest run of consecutive non-finite losses that ended in this interval, on any rank."""
    data_wait_s: float
    """Seconds blocked on the loader, mean over ranks."""
    elapsed_s: float
    """Wall time of the interval on this rank."""
    first_step_s: float | None = None
    """This process's first step (torch.compile's compilation, cuDNN's algorithm search, the loader's start),
    timed apart, in the first report after it; None in every other report."""

    @property
    def images_per_s(self) -> float:
        """Training throughput of the interval, all ranks together."""
        return self.images / self.elapsed_s

    @property
    def data_wait_share(self) -> float:
        """The part of the interval a rank spent waiting for data."""
        return self.data_wait_s / self.elapsed_s


class IntervalMeter:
    """Sums each step's loss, image count and data wait on the device; `report()` reduces them over ranks.
    Also totals the training time and images of the whole run, reports included, evaluation excluded."""

    def __init__(self, device: torch.device, running_stats: list[torch.Tensor], *, world_size: int,
                 max_nonfinite_steps: int, preemption: PreemptionFlag) -> None:
        """`running_stats`: the model's floating buffers (BatchNorm running averages), rolled back after a
        skipped step. `preemption`: this rank's SIGTERM flag, voted on after every step (`stop_agreed`)."""
        self.device = device
        # Consecutive non-finite losses up to the latest step, on this rank (carried across intervals).
        self.nonfinite_streak = torch.zeros((), dtype=torch.float64, device=device)
        self.running_stats = running_stats
        self.stats_at_start: list[torch.Tensor] = []
        self.stop_vote = StopVote(preemption, device)
        self.world_size = world_size
        """Ranks that the data wait is averaged over."""
        self.max_nonfinite_steps = max_nonfinite_steps
        """optim.max_nonfinite_steps: the streak that stops the run."""
        self.train_time_s = 0.0
        """Wall time of every finished interval since this process started."""
        self.train_images = 0
        """Images of every finished interval, all ranks together."""
        self._rollback = False
        self._first_step_s: float | None = None
        self.restart()

    def restart(self) -> None:
        """Begin a new interval now: zero the sums, and first roll the BatchNorm statistics back to the last
        interval's start if it skipped a step (its forward passes still folded NaN batch statistics into the
        running averages; they re-converge quickly)."""
        if self._rollback:
            torch._foreach_copy_(self.running_stats, self.stats_at_start)
            self._rollback = False
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.finite_losses = torch.zeros_like(self.loss_sum)
        self.images = torch.zeros_like(self.loss_sum)
        self.nonfinite_losses = torch.zeros_like(self.loss_sum)
        self.longest_streak = torch.zeros_like(self.loss_sum)
        self.data_wait_s = 0.0
        self.stats_at_start = [buffer.clone() for buffer in self.running_stats]
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """Count the block's time as data wait: host time blocked on the loader (and the copy's launch),
        while the device may idle."""
        start = time.perf_counter()
        yield
        self.data_wait_s += time.perf_counter() - start

    def add_step(self, loss: torch.Tensor, *, images: int) -> None:
        """Count one step's mean loss (on the device) and images, without a host sync."""
        loss = loss.double()
        finite = torch.isfinite(loss)
        self.nonfinite_streak = (self.nonfinite_streak + 1) * ~finite
        self.longest_streak = torch.maximum(self.longest_streak, self.nonfinite_streak)
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.finite_losses += finite.double()
        self.images += images
        self.nonfinite_losses += (~finite).double()

    def set_aside_first_step(self, *, images: int) -> None:
        """Time the interval's steps so far (this process's first step) apart from it: they count towards the
        run's totals and the next report's first_step_s, not its images/s. One host sync."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self._first_step_s = now - self.start
        self.train_time_s += self._first_step_s
        self.train_images += images * self.world_size
        self.images -= images
        self.data_wait_s = 0.0
        self.start = now

    def report(self) -> IntervalReport:
        """Reduce the interval over ranks: two collectives, which every rank must reach at the same step, and
        the interval's host syncs (which also make its timing honest)."""
        sums = torch.stack([self.loss_sum, self.finite_losses, self.images, self.nonfinite_losses,
                            torch.tensor(self.data_wait_s, dtype=torch.float64, device=self.device)])
        loss_sum, finite_losses, images, nonfinite, data_wait_sum_s = all_reduce_sum(sums).tolist()
        streak = all_reduce_max(self.longest_streak.clone()).item()
        elapsed_s = time.perf_counter() - self.start
        self.train_time_s += elapsed_s
        self.train_images += int(images)
        self._rollback = nonfinite > 0
        return IntervalReport(
            loss=loss_sum / finite_losses if finite_losses else float("nan"), images=int(images),
            nonfinite_losses=int(nonfinite), longest_nonfinite_streak=int(streak),
            data_wait_s=data_wait_sum_s / self.world_size, elapsed_s=elapsed_s,
            first_step_s=self._take_first_step_s())

    def stop_agreed(self) -> bool:
        """After a step: whether all ranks now agree to stop for a SIGTERM (see `trainer.preempt.StopVote`)."""
        return self.stop_vote.after_step()

    def _take_first_step_s(self) -> float | None:
        first_step_s, self._first_step_s = self._first_step_s, None
        return first_step_s

    def check_divergence(self, report: IntervalReport, step: int) -> None:
        """Stop the run (`TrainingDiverged`) when too many consecutive steps had a non-finite loss."""
        if report.longest_nonfinite_streak >= self.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{report.longest_nonfinite_streak} consecutive steps before step {step} had a non-finite loss and "
                f"were skipped (optim.max_nonfinite_steps={self.max_nonfinite_steps}); the weights of the last "
                "checkpoint are intact. Lower optim.lr or use a longer warm-up.")
