"""Per-iteration learning rate: linear warm-up, then cosine, linear or step decay."""

from __future__ import annotations

import bisect
import math

from configs.schema import ScheduleConfig


def learning_rate(step: int, *, peak_lr: float, steps_per_epoch: int, cfg: ScheduleConfig) -> float:
    """The lr for 0-based optimiser step `step` of a run of cfg.epochs x steps_per_epoch steps."""
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        # (step + 1) so that the first step already moves the weights.
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if cfg.decay == "cosine":
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.decay == "linear":
        return peak_lr * (1.0 - progress)
    epoch = step / steps_per_epoch
    return peak_lr * cfg.step_gamma ** bisect.bisect_right(cfg.step_milestones, epoch)
