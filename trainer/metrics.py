"""Where measured numbers go: the `MetricSink` protocol and the console sink."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Protocol, TextIO

from data_pipeline.storage import atomic_write


class MetricSink(Protocol):
    """Receives metrics keyed by name at a global optimiser step, and news of committed checkpoints."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record `metrics` as measured at `step`."""
        ...

    def on_checkpoint(self, step: int, url: str) -> None:
        """Checkpoint `step` is committed at `url` (called on every rank that has the sink, at the same steps)."""
        ...


class ConsoleSink:
    """Prints one line per report: training progress with images/s and ETA, or evaluation results."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        """Where lines go; None: whatever sys.stdout is at the time of each line."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Print `metrics` at `step` as one line."""
        parts = [f"step {step}"]
        for name, value in metrics.items():
            if name == "eta_s":
                parts.append(f"eta {_format_duration(value)}")
            elif name.endswith(("top1", "top5")):
                parts.append(f"{name} {100 * value:.2f}%")
            elif name == "progress":
                parts[0] = f"step {step} ({100 * value:.1f}%)"
            elif name.endswith("_share"):
                parts.append(f"{name.removesuffix('_share').replace('_', ' ')} {100 * value:.0f}%")
            elif name in ("epoch", "images_per_s"):
                parts.append(f"{name} {value:.1f}")
            elif name == "first_step_s":
                parts.append(f"first step (compile, warm-up) {value:.1f} s")
            elif name == "nonfinite_losses":
                if value:
                    parts.append(f"skipped non-finite {int(value)}")
            else:
                parts.append(f"{name} {value:.4g}")
        print(" | ".join(parts), file=self.stream or sys.stdout, flush=True)

    def on_checkpoint(self, step: int, url: str) -> None:
        """Print where checkpoint `step` went."""
        print(f"step {step} | checkpoint {url}", file=self.stream or sys.stdout, flush=True)


def _parse(line: str) -> dict[str, float] | None:
    """One line of metrics.jsonl, or None for a blank or torn one (a process killed mid-write)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def read_reports(path: Path) -> list[dict[str, float]]:
    """Every record (a JSON object with a "step") of the JSON-lines file at `path`, such as metrics.jsonl, in
    order (none if it does not exist; torn lines skipped)."""
    if not path.is_file():
        return []
    return [record for line in path.read_text().splitlines() if (record := _parse(line)) is not None]


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class JsonLinesSink:
    """Appends one JSON object per report to a file: {"step", "time" (Unix seconds), **metrics}.

    A run that resumes into the same folder passes the step it resumes from: lines of later steps, written
    by the attempt that died after that checkpoint, are dropped, so that every step appears once.
    """

    def __init__(self, path: Path, *, resume_step: int = 0) -> None:
        self.path = path
        if path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if (record := _parse(line)) is not None and record["step"] <= resume_step]
            atomic_write(path, "".join(kept))

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Append `metrics` at `step` as one line."""
        with self.path.open("a") as file:
            file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def on_checkpoint(self, step: int, url: str) -> None:
        """Nothing: checkpoints are listed in their own folder."""
