"""The launcher on this machine: one process (its first GPU or its CPU), or each of the processes that
`torchrun` starts (it sets RANK, LOCAL_RANK and WORLD_SIZE; the process group then comes from the env)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

import trainer
from configs.schema import RunConfig
from launch.rundir import create_run_dir, write_summary
from trainer.checkpoint import CheckpointManager
from trainer.dist import DistContext, init_distributed, is_distributed, single_process_context
from trainer.metrics import ConsoleSink, JsonLinesSink, MetricSink


def run_local(cfg: RunConfig) -> dict[str, Any] | None:
    """Train in this process; on the primary one print a summary table and return the summary saved with the
    run (None on other ranks)."""
    ctx = _context_from_environment()
    try:
        return _run(cfg, ctx)
    finally:
        if is_distributed():
            torch.distributed.destroy_process_group()


def _context_from_environment() -> DistContext:
    if "WORLD_SIZE" not in os.environ:
        return single_process_context()
    return init_distributed(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))


def _run(cfg: RunConfig, ctx: DistContext) -> dict[str, Any] | None:
    # Rank 0 names the run and makes its folder; the others take its resolved config, so that every rank
    # agrees on the run name and checkpoint URL (generated names contain the time).
    resolved: list[RunConfig | None] = [None]
    failure: Exception | None = None
    if ctx.is_primary:
        try:
            resolved[0], _ = create_run_dir(cfg)
        except FileExistsError as error:
            failure = error
    if is_distributed():
        torch.distributed.broadcast_object_list(resolved, src=0)
    if failure is not None:
        raise failure
    if resolved[0] is None:
        raise FileExistsError("rank 0 could not create the run folder (see its error)")
    cfg = resolved[0]
    run_dir = Path(cfg.launch.runs_dir).resolve() / str(cfg.launch.name)
    if ctx.is_primary:
        print(f"run {cfg.launch.name}: {cfg.model.name} on {ctx.world_size} x {ctx.device.type}, outputs in "
              f"{run_dir}", flush=True)
    start = time.perf_counter()
    sinks: list[MetricSink] = [ConsoleSink(), JsonLinesSink(run_dir / "metrics.jsonl")] if ctx.is_primary else []
    result = trainer.run(cfg, ctx, sinks)
    if not ctx.is_primary:
        return None
    summary = {
        "run_name": cfg.launch.name,
        "model": cfg.model.name,
        "device": ctx.device.type,
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
