"""The single-process launcher: this machine, one process, its first GPU or its CPU."""

from __future__ import annotations

import time
from typing import Any

import trainer
from configs.schema import RunConfig
from launch.rundir import create_run_dir, write_summary
from trainer.checkpoint import CheckpointManager
from trainer.dist import single_process_context
from trainer.metrics import ConsoleSink, JsonLinesSink


def run_local(cfg: RunConfig) -> dict[str, Any]:
    """Train in this process, print a summary table and return the summary that was saved with the run."""
    cfg, run_dir = create_run_dir(cfg)
    ctx = single_process_context()
    print(f"run {cfg.launch.name}: {cfg.model.name} on {ctx.device}, outputs in {run_dir}", flush=True)
    start = time.perf_counter()
    result = trainer.run(cfg, ctx, [ConsoleSink(), JsonLinesSink(run_dir / "metrics.jsonl")])
    summary = {
        "run_name": cfg.launch.name,
        "model": cfg.model.name,
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "epochs": result.epochs,
        "steps": result.steps,
        "images_per_s": result.images_per_s,
        "train_time_s": result.train_time_s,
        "wall_time_s": time.perf_counter() - start,
        **result.val,
        "checkpoint_url": f"{cfg.checkpoint.url}/{CheckpointManager.folder(result.steps)}",
        "run_dir": str(run_dir),
    }
    write_summary(run_dir, summary)
    print(format_summary(summary), flush=True)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A two-column table of the numbers a user looks at first."""
    rows = [
        ("model", summary["model"]),
        ("device", f"{summary['device']} x {summary['world_size']}"),
        ("epochs / steps", f"{summary['epochs']} / {summary['steps']}"),
        ("train images/s", f"{summary['images_per_s']:.1f}"),
        ("train time", f"{summary['train_time_s']:.1f} s (wall {summary['wall_time_s']:.1f} s)"),
        ("val top-1", f"{100 * summary['val_top1']:.2f}% of {int(summary['val_images'])} images"),
        ("val top-5", f"{100 * summary['val_top5']:.2f}%"),
        ("val loss", f"{summary['val_loss']:.4f}"),
        ("checkpoint", summary["checkpoint_url"]),
        ("run folder", summary["run_dir"]),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
