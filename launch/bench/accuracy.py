"""`bench accuracy`: time to a val top-1 target for variants of one recipe, run one after the other on the same
machine, with each variant's ratio to the first (the side-by-side measurement README and BENCHMARKS.md quote).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from configs import load_config


QUICKSTART_VARIANTS: dict[str, tuple[str, ...]] = {
    "recipe as it is (16 px)": (),
    # Of the quickstart's 10 epochs: 8 px crops (a quarter of the pixels) for epochs 0-3, then 12 and 16 px
    # (FFCV's shape: low resolution for the first 40%, full size from 60-70%).
    "progressive 8 -> 16 px, late ramp": ("data.progressive_start_size=8", "data.progressive_start_epoch=3",
                                          "data.progressive_end_epoch=6", "data.progressive_multiple=4"),
    # 8 px for epochs 0-1 only, 16 px from epoch 3.
    "progressive 8 -> 16 px, early ramp": ("data.progressive_start_size=8", "data.progressive_start_epoch=1",
                                           "data.progressive_end_epoch=3", "data.progressive_multiple=4"),
}
"""The variants `bench accuracy` compares by default, as config overrides of the quickstart recipe."""
LEVER_VARIANTS: dict[str, tuple[str, ...]] = {
    "recipe as it is (SGD, cross-entropy)": (),
    "AdamW (lr 2e-3, weight decay 0.05)": ("optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.05"),
    # "ResNet strikes back"'s optimiser and loss, at its rate and decay (its batch is 32x this one).
    "LAMB + BCE (lr 8e-3, weight decay 0.02, threshold 0.2)": (
        "optim.name=lamb", "optim.lr=0.008", "optim.weight_decay=0.02", "optim.loss=bce",
        "optim.bce_target_threshold=0.2"),
    "stochastic depth 0.05": ("model.drop_path_rate=0.05",),
    "repeated augmentation x2": ("data.repeated_augmentation=2",),
    "gradient clipping at norm 1": ("optim.clip_grad_norm=1.0",),
}
"""`bench accuracy --set levers`: the recipe levers one at a time on the quickstart (README's recipe levers)."""
VARIANT_SETS = {"resizing": QUICKSTART_VARIANTS, "levers": LEVER_VARIANTS}
"""The named sets of variants `--set` chooses from."""


@dataclass(frozen=True, slots=True)
class AccuracyRow:
    """One variant's run."""

    variant: str
    overrides: tuple[str, ...]
    target: float
    time_to_target_s: float | None
    """The run's own elapsed time at the first evaluation that reached the target (None: never reached)."""
    epoch: int | None
    """Epochs trained by that evaluation."""
    final_top1: float
    images_per_s: float
    wall_time_s: float
    run_dir: str


def bench_accuracy(config: str, overrides: list[str], *, target: float,
                   variants: dict[str, tuple[str, ...]]) -> list[AccuracyRow]:
    """Train each variant of `config` (its overrides after `overrides`) until its first evaluation at or above
    `target` (schedule.target_top1), without tracking or registration; the runs' folders stay."""
    from launch.bench.train import untracked
    from launch.orchestration import start_run

    rows = []
    for variant, changes in variants.items():
        cfg = untracked(load_config(config, [*overrides, *changes, f"schedule.target_top1={target}"]))
        summary = start_run(cfg)
        assert summary is not None  # a Ray or single-process launch reports on this process
        reached = summary.time_to_accuracy.get(str(target))
        rows.append(AccuracyRow(
            variant=variant, overrides=changes, target=target,
            time_to_target_s=None if reached is None else reached["elapsed_s"],
            epoch=None if reached is None else int(reached["epoch"]), final_top1=summary.val["val_top1"],
            images_per_s=summary.images_per_s, wall_time_s=summary.wall_time_s, run_dir=summary.run_dir))
    return rows


def table(rows: list[AccuracyRow], *, config: str, machine: str) -> str:
    """The side-by-side report: each variant's time to the target and its ratio to the first variant's."""
    first = rows[0].time_to_target_s
    lines = [f"bench accuracy: {config}, time to val top-1 >= {100 * rows[0].target:.4g}% (trainer's clock), "
             f"one variant after the other on {machine}",
             "| variant | time to target | epochs trained | x first | final top-1 | images/s | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        seconds = row.time_to_target_s
        time_to_target, epoch, ratio = ("not reached", "-", "-") if seconds is None else (
            f"{seconds:.1f} s", str(row.epoch), f"{seconds / first:.2f}" if first else "-")
        lines.append(f"| {row.variant} | {time_to_target} | {epoch} | {ratio} | {100 * row.final_top1:.2f}% | "
                     f"{row.images_per_s:.1f} | {row.wall_time_s:.0f} s |")
    return "\n".join(lines)


def as_json(rows: list[AccuracyRow]) -> str:
    """One machine-readable line per variant."""
    return "\n".join(json.dumps(dataclasses.asdict(row)) for row in rows)
