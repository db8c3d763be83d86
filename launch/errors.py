"""How a command ends: the errors the launchers raise, and the one table from an exception to the exit
status and the word printed before its message. Importable without the optional dependencies."""

from __future__ import annotations

from dataclasses import dataclass

from configs.errors import UserError
from trainer.checkpoint import CheckpointUnreadable
from trainer.meter import TrainingDiverged
from trainer.preempt import Preempted


class RunFailed(RuntimeError):
    """The workers failed more often than launch.max_failures allows; the message names the last checkpoint."""


class WorkerUserError(UserError):
    """A worker stopped on an error a restart cannot fix (bad config, data, checkpoint); the message is the
    worker's."""


class TrackingIncomplete(Exception):
    """Training finished and its checkpoint is safe, but tracking or registration did not complete."""


class PromotionRefused(Exception):
    """The promotion gate refused to move the alias; the message gives its reason."""


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """One row of the table: an exception kind, the status a command exits with, and what it means."""

    error: type[BaseException]
    """Raised anywhere below the command (subclasses included)."""
    status: int
    """The process's exit status."""
    label: str
    """Printed before the error's message on stderr."""
    meaning: str
    """For the help text and README."""


EXIT_STATUSES = (
    ExitStatus(UserError, 2, "error", "bad input: a config key or value, a data set, a path, a missing extra"),
    # EX_IOERR: the storage failed after retries; nothing was moved, so running again continues the run.
    ExitStatus(CheckpointUnreadable, 74, "storage error",
               "the checkpoint storage kept failing to read (after retries); every step is where it was"),
    ExitStatus(FileNotFoundError, 2, "error", "a file or run that does not exist"),
    ExitStatus(FileExistsError, 2, "error", "a run folder or checkpoint that exists already"),
    ExitStatus(TrainingDiverged, 3, "training stopped", "training diverged (non-finite losses)"),
    ExitStatus(RunFailed, 4, "error", "the workers failed more often than launch.max_failures allows (Ray)"),
    ExitStatus(PromotionRefused, 5, "promotion refused", "the promotion gate refused the move"),
    ExitStatus(TrackingIncomplete, 6, "tracking incomplete",
               "trained and checkpointed, but the tracking server never answered or registration failed"),
    # EX_TEMPFAIL, "try again": schedulers that requeue on it resume the run from its checkpoint.
    ExitStatus(Preempted, 75, "preempted", "preempted by SIGTERM after a checkpoint: requeue to resume"),
)
"""Checked in order; the first row whose kind the error is decides."""


def exit_status_of(error: BaseException) -> ExitStatus | None:
    """The row for `error`, or None for an error that is a bug (it propagates with its traceback)."""
    return next((row for row in EXIT_STATUSES if isinstance(error, row.error)), None)


def describe_exit_statuses() -> str:
    """The table as text: '0 done; 2 bad input ...'."""
    rows: dict[int, str] = {}
    for row in EXIT_STATUSES:
        rows.setdefault(row.status, row.meaning)
    return "; ".join(["0 done", *(f"{status} {meaning}" for status, meaning in sorted(rows.items()))])
