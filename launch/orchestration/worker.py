"""What every training process runs once its run folder exists, whichever launcher started it."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import trainer
from configs.schema import RunConfig
from launch.orchestration.rundir import METRICS_FILE
from launch.orchestration.starts import record_start, start_counts
from launch.orchestration.summary import RunSummary
from trainer.checkpoint import open_checkpoints
from trainer.dist import DistContext
from trainer.lease import Claimant
from trainer.metrics import ConsoleSink, JsonLinesSink, MetricSink

if TYPE_CHECKING:
    from launch.tracking.sink import MlflowSink


def train_process(cfg: RunConfig, ctx: DistContext, run_dir: Path, *, launch_id: str,
                  extra_sinks: Sequence[MetricSink] = (), print_summary: bool = True) -> RunSummary | None:
    """Train this process's share of the run in `run_dir`; on the primary process also print progress, append
    metrics.jsonl, and write (and with `print_summary` print) the summary, which it returns (None on other
    ranks). `extra_sinks` go to every rank (a launcher's own reporting, which must happen on all ranks alike)."""
    start = time.perf_counter()
    sinks: list[MetricSink] = list(extra_sinks)
    tracker = None
    if ctx.is_primary:
        assert cfg.checkpoint.url is not None, "the launcher sets checkpoint.url"
        latest = open_checkpoints(cfg.checkpoint.url).latest()
        resume_step = latest.step if latest is not None else 0
        where = f", resuming from step {resume_step}" if resume_step else ""
        print(f"run {cfg.launch.name}: {cfg.model.name} on {ctx.world_size} x {ctx.device.type}{where}, outputs in "
              f"{run_dir}", flush=True)
        if ctx.device.type == "cuda":
            # Which GPU this process trains on, as the launcher (Ray) placed it.
            print(f"run {cfg.launch.name}: rank 0 trains on {ctx.device} ({torch.cuda.get_device_name(ctx.device)}), "
                  f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(all)')}", flush=True)
        begun = record_start(run_dir, step=resume_step, world_size=ctx.world_size)  # before metrics are cut back
        if begun.reached is not None:
            print(f"run {cfg.launch.name}: {begun.describe()}", flush=True)
        metrics_file = JsonLinesSink(run_dir / METRICS_FILE, resume_step=resume_step)
        sinks += [ConsoleSink(), metrics_file]
        if cfg.tracking.enabled:
            from launch.tracking.sink import MlflowSink

            tracker = MlflowSink(cfg, run_dir, world_size=ctx.world_size, device=str(ctx.device),
                                 checkpointed=latest.meta.get("mlflow") if latest is not None else None)
            sinks.append(tracker)
        if begun.previous_world_size is not None and begun.cause is not None:
            recorders: list[MetricSink] = [metrics_file, *([tracker] if tracker is not None else [])]
            for sink in recorders:
                sink.log({"world_size": ctx.world_size, "previous_world_size": begun.previous_world_size},
                         step=resume_step)
    initial_state = None
    if cfg.model.init_from is not None:
        from launch.tracking.artifacts import load_initial_state
        from launch.tracking.store import tracking_uri

        initial_state = load_initial_state(cfg.model.init_from, tracking_uri=tracking_uri(cfg))
    try:
        result = trainer.run(cfg, ctx, sinks, extra_meta=tracker.checkpoint_meta if tracker is not None else None,
                             claimant=Claimant(run=str(cfg.launch.name), launch=launch_id),
                             initial_state=initial_state)
    except BaseException:
        if tracker is not None:
            tracker.close(status="FAILED", timeout_s=10)
        raise
    if not ctx.is_primary:
        return None
    assert cfg.checkpoint.url is not None
    counts = start_counts(run_dir)
    summary = RunSummary(
        run_name=str(cfg.launch.name), model=cfg.model.name, device=ctx.device.type,
        device_name=torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        world_size=ctx.world_size,
        epochs=result.epochs, steps=result.steps, images_per_s=result.images_per_s,
        train_time_s=result.train_time_s, val=result.val, stopped_at_target=result.stopped_at_target,
        time_to_accuracy=result.time_to_accuracy, restarts=counts["restarts"], resizes=counts["resizes"],
        steps_redone=counts["steps_redone"],
        checkpoint_url=open_checkpoints(cfg.checkpoint.url).url(result.steps), run_dir=str(run_dir))
    if tracker is not None:
        summary = _finish_tracking(cfg, tracker, summary, device=ctx.device)
    summary = replace(summary, wall_time_s=time.perf_counter() - start)
    summary.save(run_dir)
    if print_summary:
        print(summary.table(), flush=True)
    return summary


def _finish_tracking(cfg: RunConfig, tracker: MlflowSink, summary: RunSummary, *,
                     device: torch.device) -> RunSummary:
    """End the MLflow run, register its model and move the configured alias (the gate scores on `device`,
    this worker's); the summary with what came of it. A tracking failure here is printed, never raised: the
    trained checkpoint is already safe."""
    from launch.tracking import registry

    delivered = tracker.close()
    summary = replace(summary, tracking_uri=tracker.uri, mlflow_run_id=tracker.run_id)
    if not delivered:
        return replace(summary, tracking_error=f"{tracker.uri} did not take the run's metrics and artifacts"
                                               + ("" if tracker.run_id else " (the run was never created there)")
                                               + (": the model was not registered" if cfg.tracking.register else ""))
    if not cfg.tracking.register:
        return summary
    assert cfg.checkpoint.url is not None and tracker.run_id is not None
    try:
        model_uri = registry.register_model(cfg, tracking_uri=tracker.uri, run_id=tracker.run_id,
                                            checkpoint_url=cfg.checkpoint.url, device=device)
        summary = replace(summary, model_uri=model_uri)
        print(f"mlflow: registered {model_uri}", flush=True)
        if cfg.tracking.promote_alias is not None:
            version = model_uri.rsplit("/", 1)[1]
            decision = registry.promote(tracker.uri, registry.model_name(cfg), version, cfg.tracking.promote_alias,
                                        metric=cfg.tracking.promote_metric, minimum=cfg.tracking.promote_min,
                                        max_regression=cfg.tracking.promote_max_regression,
                                        eval_data=cfg.tracking.promote_eval_data, device=device)
            summary = replace(summary, promotion=decision.describe(dry_run=False))
            print(f"mlflow: {summary.promotion}", flush=True)
    except Exception as error:  # noqa: BLE001 - reported, and the summary says what is missing
        problem = (f"could not register the model of run {tracker.run_id} at {tracker.uri}: "
                   f"{type(error).__name__}: {error}")
        print(f"mlflow: {problem}", flush=True)
        summary = replace(summary, tracking_error=problem)
    return summary
