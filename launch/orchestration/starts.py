"""Every start of a run, in `starts.jsonl` in its run folder: when, from which committed step, at which world
size, and how far the attempt before it had got. A restart (Ray's after a failure, or `train --resume`)
that resumes at another world size is a resize: an elastic run's group shrank after a failure or grew
when more workers could be had. The summary counts restarts, resizes and the steps redone (those the
previous attempt had trained past its last committed checkpoint, as far as its reports show).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from launch.orchestration.rundir import METRICS_FILE
from trainer.metrics import read_reports

STARTS_FILE = "starts.jsonl"
"""In the run folder: one JSON line per start of the run's primary process."""


@dataclass(frozen=True, slots=True)
class Start:
    """One start of the run."""

    time: float
    """Unix seconds."""
    step: int
    """The committed step it resumed from (0: the run's first start)."""
    world_size: int
    reached: int | None
    """The highest step the attempts before had reported (None: the first start)."""
    previous_world_size: int | None
    """The world size of the start before (None: the first start)."""
    cause: str | None
    """What changed the size (`resize_cause`), or None when it did not change; decided when the start is
    recorded."""

    @property
    def redone(self) -> int:
        """Steps trained again because the attempt before had not committed them."""
        return max(0, (self.reached or 0) - self.step)

    def describe(self) -> str:
        """One console line."""
        line = (f"restart at step {self.step} with {self.world_size} workers" if self.reached is not None
                else f"start with {self.world_size} workers")
        if self.cause is not None:
            line = (f"resize: {self.previous_world_size} -> {self.world_size} workers at step {self.step} "
                    f"({self.cause})")
        if self.redone:
            line += f"; the attempt before reached step {self.reached}: {self.redone} steps redone"
        return line


def resize_cause(previous_world_size: int | None, world_size: int) -> str | None:
    """Why a start's world size differs from the one before, or None when it does not."""
    if previous_world_size is None or previous_world_size == world_size:
        return None
    if world_size < previous_world_size:
        return "shrank: fewer workers could be had after the last attempt ended"
    return "grew: more workers could be had"


def record_start(run_dir: Path, *, step: int, world_size: int) -> Start:
    """Append this start to starts.jsonl (call before metrics.jsonl is cut back to `step`) and return it."""
    previous = read_starts(run_dir)
    reached = None
    if previous:
        reached = int(max([0, *(record["step"] for record in read_reports(run_dir / METRICS_FILE))]))
    previous_world_size = previous[-1].world_size if previous else None
    start = Start(time=time.time(), step=step, world_size=world_size, reached=reached,
                  previous_world_size=previous_world_size, cause=resize_cause(previous_world_size, world_size))
    path = run_dir / STARTS_FILE
    # A line torn by a node lost mid-append stays torn; this one starts on a line of its own.
    torn = path.is_file() and not path.read_bytes().endswith(b"\n") and path.stat().st_size > 0
    with path.open("a") as file:
        file.write(("\n" if torn else "") + json.dumps(dataclasses.asdict(start)) + "\n")
    return start


def read_starts(run_dir: Path) -> list[Start]:
    """The run's starts, oldest first (a torn line, a node lost mid-write, is skipped)."""
    fields = [f.name for f in dataclasses.fields(Start)]
    records = cast(list[dict[str, Any]], read_reports(run_dir / STARTS_FILE))
    return [Start(**{name: record[name] for name in fields}) for record in records
            if all(name in record for name in fields)]


def start_counts(run_dir: Path) -> dict[str, int]:
    """restarts, resizes and steps_redone over the run's starts so far."""
    starts = read_starts(run_dir)
    return {"restarts": max(0, len(starts) - 1), "resizes": sum(s.cause is not None for s in starts),
            "steps_redone": sum(s.redone for s in starts)}

