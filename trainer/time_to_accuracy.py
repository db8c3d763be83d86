"""Time to accuracy: when a run first reached each val top-1 threshold, in its own elapsed time and in
device-hours, carried across restarts by its checkpoints.

The run's elapsed time is the time of the attempts that led to its newest checkpoint: each attempt adds its
own time (start-up, training, evaluation, saving) from where the checkpoint it resumed left off. Work a
failure threw away (steps after the last checkpoint) and the time between attempts are not counted; the
summary's wall time says what the last attempt took. Device-hours weigh each attempt by its world size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

META_KEY = "time_to_accuracy"
"""Where a checkpoint's manifest meta keeps the state."""


def threshold_name(threshold: float) -> str:
    """A threshold as a percentage for metric names: 0.98 -> "98", 0.755 -> "75.5"."""
    return f"{100 * threshold:.4g}"


@dataclass(slots=True)
class TimeToAccuracy:
    """The run's elapsed time and the first evaluation that reached each threshold."""

    thresholds: tuple[float, ...]
    """Val top-1 fractions to time, increasing."""
    world_size: int
    """Processes of this attempt (for device-hours)."""
    elapsed_before_s: float = 0.0
    """The run's elapsed time when this attempt's checkpoint was written (0 for a fresh run)."""
    device_hours_before: float = 0.0
    """Likewise in device-hours."""
    reached: dict[str, dict[str, float]] = field(default_factory=dict)
    """Threshold ("0.98") -> step, epoch, elapsed_s and device_hours of the first evaluation that reached it."""
    started: float = field(default_factory=time.perf_counter)
    """When this attempt started (perf_counter)."""

    def restore(self, meta: dict[str, Any]) -> None:
        """Continue from what a checkpoint's meta recorded (`state`); nothing for a fresh run."""
        saved = meta.get(META_KEY)
        if saved is not None:
            self.elapsed_before_s = saved["elapsed_s"]
            self.device_hours_before = saved["device_hours"]
            self.reached = {key: dict(value) for key, value in saved["reached"].items()}

    def elapsed(self) -> tuple[float, float]:
        """The run's elapsed seconds and device-hours now."""
        attempt_s = time.perf_counter() - self.started
        return self.elapsed_before_s + attempt_s, self.device_hours_before + attempt_s * self.world_size / 3600

    def record(self, val_top1: float, *, step: int, epoch: int) -> dict[str, float]:
        """Note the thresholds this evaluation reaches for the first time; return their metrics
        (`time_to_top1_<percent>_s`, `device_hours_to_top1_<percent>`)."""
        elapsed_s, device_hours = self.elapsed()
        metrics = {}
        for threshold in self.thresholds:
            if val_top1 >= threshold and str(threshold) not in self.reached:
                self.reached[str(threshold)] = {"step": step, "epoch": epoch, "elapsed_s": elapsed_s,
                                                "device_hours": device_hours}
                metrics[f"time_to_top1_{threshold_name(threshold)}_s"] = elapsed_s
                metrics[f"device_hours_to_top1_{threshold_name(threshold)}"] = device_hours
        return metrics

    def state(self) -> dict[str, Any]:
        """What a checkpoint's meta keeps (under `META_KEY`) for `restore`."""
        elapsed_s, device_hours = self.elapsed()
        return {META_KEY: {"elapsed_s": elapsed_s, "device_hours": device_hours, "reached": self.reached}}


__all__ = ["META_KEY", "TimeToAccuracy", "threshold_name"]
