"""The run summary: what a finished run measured and where its outputs are, saved as `summary.json` in the
run folder (for scripts and CI systems that drive the trainer) and printed as a table."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.storage import atomic_write

SUMMARY_FILE = "summary.json"
"""In the run folder."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSummary:
    """One finished run. In summary.json the `val` scores are top-level keys (val_top1, ...)."""

    run_name: str
    """launch.name."""
    model: str
    """model.name."""
    device: str
    """Device type the workers trained on: cuda or cpu."""
    device_name: str = ""
    """What rank 0 trained on, by name ("NVIDIA H200", "cpu"); empty in summaries written before it was kept."""
    world_size: int
    """Training processes."""
    epochs: int
    """Epochs of the schedule."""
    steps: int
    """Global optimiser steps reached."""
    images_per_s: float
    """Measured training throughput of the last attempt, all workers together, evaluation excluded."""
    train_time_s: float
    """Wall time of the last attempt's training steps."""
    val: dict[str, float]
    """The last evaluation: val_loss, val_top1, val_top5, val_images (and ema_val_* with an EMA)."""
    checkpoint_url: str
    """The final checkpoint's step folder."""
    run_dir: str
    """The run folder."""
    tracking_uri: str | None = None
    """The MLflow store the run was tracked in (None: tracking off)."""
    mlflow_run_id: str | None = None
    """Its MLflow run."""
    model_uri: str | None = None
    """The registered version, models:/NAME/VERSION (None: not registered)."""
    promotion: str | None = None
    """The gate's decision at the end of the run, if tracking.promote_alias was set."""
    tracking_error: str | None = None
    """What tracking or registration failed to do (the trained checkpoint is safe); None when all of it
    happened. A run with one exits with `TrackingIncomplete`'s status."""
    wall_time_s: float = field(default=0.0)
    """Wall time of this process's whole attempt, start-up and evaluation included."""
    stopped_at_target: bool = False
    """The run ended before its last epoch, at the first evaluation that reached schedule.target_top1."""
    time_to_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    """Val top-1 threshold ("0.98") -> step, epoch, elapsed_s and device_hours where the run first reached it
    (elapsed time of the attempts that led there; see trainer/time_to_accuracy.py)."""

    restarts: int = 0
    """Starts of the run after its first (Ray's restarts after failures, `train --resume`)."""
    resizes: int = 0
    """Restarts at another world size (an elastic run's group shrank or grew; see starts.jsonl)."""
    steps_redone: int = 0
    """Steps trained again after restarts: those an attempt reported past its last committed checkpoint."""

    def to_dict(self) -> dict[str, Any]:
        """The summary.json record."""
        record = dataclasses.asdict(self)
        val = record.pop("val")
        wall_time_s = record.pop("wall_time_s")
        for optional in ("promotion", "tracking_error"):
            if record[optional] is None:
                del record[optional]
        at = list(record).index("checkpoint_url")
        items = list(record.items())
        return {**dict(items[:at]), **val, **dict(items[at:]), "wall_time_s": wall_time_s}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> RunSummary:
        """Read back what `to_dict` wrote."""
        names = {f.name for f in dataclasses.fields(cls)}
        val = {key: value for key, value in record.items() if key not in names}
        return cls(**{key: value for key, value in record.items() if key in names}, val=val)

    def save(self, run_dir: Path) -> Path:
        """Write summary.json into `run_dir`."""
        path = run_dir / SUMMARY_FILE
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, run_dir: Path) -> RunSummary:
        """The summary.json in `run_dir`."""
        return cls.from_dict(json.loads((run_dir / SUMMARY_FILE).read_text()))

    def table(self) -> str:
        """A two-column table of the numbers a user looks at first."""
        rows = [
            ("model", self.model),
            ("device", f"{self.device_name or self.device} x {self.world_size}"),
            ("epochs / steps", f"{self.epochs} / {self.steps}" + (", stopped at the val top-1 target" if
                                                                  self.stopped_at_target else "")),
            ("train images/s", f"{self.images_per_s:.1f}"),
            ("train time", f"{self.train_time_s:.1f} s (wall {self.wall_time_s:.1f} s)"),
            ("val top-1", f"{100 * self.val['val_top1']:.2f}% of {int(self.val['val_images'])} images"),
            ("val top-5", f"{100 * self.val['val_top5']:.2f}%"),
            ("val loss", f"{self.val['val_loss']:.4f}"),
            *([("time to top-1", self._highest_levels_reached())] if self.time_to_accuracy else []),
            *([("restarts", f"{self.restarts} ({self.resizes} resizes, {self.steps_redone} steps redone)")]
              if self.restarts else []),
            ("checkpoint", self.checkpoint_url),
            ("run folder", self.run_dir),
        ]
        if self.tracking_uri:
            rows.append(("mlflow run", f"{self.mlflow_run_id} at {self.tracking_uri}"))
            rows.append(("registered as", self.model_uri or "not registered (see the messages above)"))
            if self.tracking_error:
                rows.append(("tracking failed", self.tracking_error))
            if self.promotion:
                rows.append(("promotion", self.promotion))
            rows.append(("look at it", ui_command(self.tracking_uri)))
        width = max(len(label) for label, _ in rows)
        return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)

    def _highest_levels_reached(self) -> str:
        """The three highest val top-1 levels reached, with when, for the table."""
        highest = sorted(self.time_to_accuracy.items(), key=lambda item: float(item[0]))[-3:]
        return "; ".join(f"{100 * float(level):g}% in {at['elapsed_s']:.0f} s, {at['device_hours']:.3g} device-h "
                         f"(epoch {at['epoch']:g})" for level, at in highest)


def ui_command(tracking_uri: str) -> str:
    """How to browse a tracking store: `mlflow ui` over an embedded store, the server's address otherwise."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    beside_python = Path(sys.executable).with_name("mlflow")  # this environment's own mlflow command
    command = "mlflow"
    if beside_python.is_file():
        try:
            relative = os.path.relpath(beside_python)
        except FileNotFoundError:  # the working directory is gone (Ray may delete a job's copy of it early)
            relative = ".."
        command = str(beside_python) if relative.startswith("..") else relative
    return f"{command} ui --backend-store-uri {tracking_uri}"
