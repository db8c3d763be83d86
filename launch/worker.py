"""What every training process runs once its run folder exists, whichever launcher started it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trainer
from configs.schema import RunConfig
from data_pipeline.fs import open_storage
from launch.rundir import format_summary, write_summary
from trainer.checkpoint import CheckpointManager
from trainer.dist import DistContext
from trainer.metrics import ConsoleSink, JsonLinesSink, MetricSink


def train_process(cfg: RunConfig, ctx: DistContext, run_dir: Path, *, extra_sinks: Sequence[MetricSink] = (),
                  print_summary: bool = True) -> dict[str, Any] | None:
    """Train this process's share of the run in `run_dir`; on the primary process also print progress, append
    metrics.jsonl, and write (and with `print_summary` print) the summary, which it returns (None on other
    ranks). `extra_sinks` go to every rank (a launcher's own reporting, which must happen on all ranks alike)."""
    start = time.perf_counter()
    sinks: list[MetricSink] = list(extra_sinks)
    tracker = None
    if ctx.is_primary:
        assert cfg.checkpoint.url is not None, "the launcher sets checkpoint.url"
        latest = CheckpointManager(open_storage(cfg.checkpoint.url), keep_last=cfg.checkpoint.keep_last).latest()
        resume_step = latest.step if latest is not None else 0
        where = f", resuming from step {resume_step}" if resume_step else ""
        print(f"run {cfg.launch.name}: {cfg.model.name} on {ctx.world_size} x {ctx.device.type}{where}, outputs in "
              f"{run_dir}", flush=True)
        sinks += [ConsoleSink(), JsonLinesSink(run_dir / "metrics.jsonl", resume_step=resume_step)]
        if cfg.tracking.enabled:
            from launch.tracking import MlflowSink

            tracker = MlflowSink(cfg, run_dir, world_size=ctx.world_size, device=ctx.device.type)
            sinks.append(tracker)
    try:
        result = trainer.run(cfg, ctx, sinks)
    except BaseException:
        if tracker is not None:
            tracker.close(status="FAILED", timeout_s=10)
        raise
    if tracker is not None:
        tracker.close()
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
    if print_summary:
        print(format_summary(summary), flush=True)
    return summary
