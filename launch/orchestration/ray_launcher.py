"""The Ray launcher: `launch.num_workers` Ray Train workers run `train_process`, and Ray restarts them after
failures. The one module that imports Ray (`pip install 'resnet-train[ray]'`).

The driver (this process) makes the run folder, joins or starts a Ray cluster and waits for a
`TorchTrainer`, which starts the workers and their process group (gloo on CPUs, nccl on GPUs). A worker
that dies (SIGKILL, a lost node) fails the worker group; so does one that gets SIGTERM (a preempted node),
after every rank has committed a checkpoint at the step they reach next (trainer/preempt.py). Ray starts a
new group, up to `launch.max_failures` times, and each new worker resumes from the latest committed
checkpoint at its exact step and data position, as every start of `trainer.run` does.

The trainer's checkpoint manager is the one record of checkpoints: Ray is told of each in metrics only.
(Ray checks, when a run of the same name starts again, that every checkpoint it was given still exists;
the trainer prunes old ones, so a `--resume` of a run that had given Ray its checkpoints failed there.)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from configs.extras import import_extra
from configs.loader import config_from_dict, config_to_dict
from configs.schema import RunConfig
from configs.errors import UserError
from data_pipeline.storage import atomic_write
from launch.errors import RunFailed, WorkerUserError
from launch.orchestration.reaper import start_reaper
from launch.orchestration.rundir import open_run_dir
from launch.orchestration.summary import RunSummary
from trainer.checkpoint import open_checkpoints
from trainer.lease import new_launch_id
from trainer.meter import TrainingDiverged
from trainer.preempt import Preempted


def run_ray(cfg: RunConfig, *, resume: bool = False) -> RunSummary:
    """Train on a Ray cluster (a new run, or with `resume` the existing run of cfg's name); print and return
    the summary the primary worker saved."""
    ray = import_extra("ray")
    train = import_extra("ray.train")
    ray_torch = import_extra("ray.train.torch")

    cfg, run_dir = open_run_dir(cfg, resume=resume)
    launch = cfg.launch
    # Ray Train reads it in the driver and passes it on to its controller.
    os.environ[GROUP_START_TIMEOUT_ENV] = str(launch.group_start_timeout_s)
    started_here = _init_ray(ray, launch.ray_address)
    use_gpu = launch.gpus_per_worker > 0
    resources = {"CPU": launch.cpus_per_worker, **({"GPU": launch.gpus_per_worker} if use_gpu else {})}
    global_batch = cfg.global_batch_size(launch.max_workers)
    workers = (f"{launch.min_workers}-{launch.max_workers} (elastic, a global batch of {global_batch} images at "
               "every size)" if launch.elastic else str(launch.num_workers))
    print(f"run {launch.name}: {workers} Ray workers x {resources}, up to {launch.max_failures} "
          f"restarts, outputs in {run_dir}", flush=True)
    trainer = ray_torch.TorchTrainer(
        _worker_loop,
        # One launch id for every attempt: a restarted primary takes over its predecessor's checkpoint lease.
        train_loop_config={"config": config_to_dict(cfg), "run_dir": str(run_dir), "launch_id": new_launch_id()},
        torch_config=ray_torch.TorchConfig(backend="nccl" if use_gpu else "gloo",
                                           timeout_s=math.ceil(cfg.distributed.timeout_s)),
        scaling_config=train.ScalingConfig(num_workers=launch.num_workers, use_gpu=use_gpu,
                                           resources_per_worker=resources,
                                           elastic_resize_monitor_interval_s=launch.resize_interval_s),
        run_config=train.RunConfig(
            name=launch.name, storage_path=launch.runs_dir,
            failure_config=train.FailureConfig(max_failures=launch.max_failures),
            # Ray Train would send each print() to its logger and to stdout: every line twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    (run_dir / FATAL_FILE).unlink(missing_ok=True)  # a resumed run tries again what stopped it last time
    try:
        trainer.fit()
    except train.TrainingFailedError as error:
        raise_recorded_fatal(run_dir)
        raise RunFailed(_failure_message(cfg, error)) from error
    finally:
        if started_here:
            ray.shutdown()
    raise_recorded_fatal(run_dir)
    summary = RunSummary.load(run_dir)
    print(summary.table(), flush=True)
    return summary


GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train's setting of launch.group_start_timeout_s."""
FATAL_FILE = "fatal_error.json"
"""In the run folder: the first error a restart cannot fix, recorded by the worker that raised it."""
NOT_RETRYABLE: tuple[type[BaseException], ...] = (UserError, TrainingDiverged)
"""Errors that every restart would meet again: a bad config, data set or checkpoint, and divergence."""


def record_fatal(run_dir: Path, rank: int, error: BaseException) -> None:
    """Keep `error` (the first one recorded wins) for the driver and for the attempts Ray starts after it."""
    if not (run_dir / FATAL_FILE).exists():
        kind = "diverged" if isinstance(error, TrainingDiverged) else "user"
        atomic_write(run_dir / FATAL_FILE, json.dumps({"rank": rank, "kind": kind, "message": str(error)}))


def raise_recorded_fatal(run_dir: Path) -> None:
    """Raise the error a worker recorded, as what it was (exit status 2 or 3), with the worker's message."""
    try:
        record = json.loads((run_dir / FATAL_FILE).read_text())
    except FileNotFoundError:
        return
    message = f"worker rank {record['rank']}: {record['message']}"
    raise TrainingDiverged(message) if record["kind"] == "diverged" else WorkerUserError(message)


def _init_ray(ray: Any, address: str | None) -> bool:
    """Join the cluster at `address` (or $RAY_ADDRESS); without either, start one on this machine, reachable
    only from it (the dashboard and jobs API run code for anyone who can reach them). True if started here."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    # The dashboard also serves the state API, which Ray Train's controller polls.
    ray.init(dashboard_host="127.0.0.1", log_to_driver=True)
    start_reaper(os.getpid())  # a killed driver leaves no part of this cluster behind
    return True


def _failure_message(cfg: RunConfig, error: Exception) -> str:
    assert cfg.checkpoint.url is not None
    checkpoints = open_checkpoints(cfg.checkpoint.url)
    latest = checkpoints.latest()
    where = (f"the last good checkpoint is {checkpoints.url(latest.step)} (step {latest.step})" if latest is not None
             else "there is no checkpoint yet")
    return (f"run {cfg.launch.name} failed {cfg.launch.max_failures + 1} times (launch.max_failures="
            f"{cfg.launch.max_failures}); {where}; continue it with `python -m launch train --resume "
            f"{cfg.launch.name}`. Last error: {error}")


class RaySink:
    """Tells Ray about each committed checkpoint, with the last training metrics, from every rank
    (`ray.train.report` is a barrier that all ranks must reach equally often)."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Remember the latest metrics (reported with the next checkpoint)."""
        self.metrics.update(metrics, step=step)

    def on_checkpoint(self, step: int, url: str) -> None:
        """Report checkpoint `step` to Ray, in metrics (see the module docstring)."""
        import_extra("ray.train").report({**self.metrics, "step": step, "checkpoint_step": step})


def _quiet_report_log() -> None:
    """Ray Train logs every `train.report` of every rank, metrics and all, at INFO; our own progress lines
    say the same once. (Its logger is named after its module's file.)"""
    import logging

    try:
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:  # another Ray layout: leave its logging alone
        return
    logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)


def _catch_sigterm_in_main_thread() -> None:
    """Make SIGTERM to this worker a preemption (a checkpoint at the step all ranks reach next, then a
    restart from it) instead of Ray's exit on the spot. Python installs handlers from the main thread only;
    this function runs in Ray Train's training thread, and the worker actor runs its methods in the main
    thread, so the handler goes in through one (Ray Train's `execute`, which calls a function there)."""
    from trainer.preempt import install_sigterm_handler

    ray = import_extra("ray")
    ray.get(ray.get_runtime_context().current_actor.execute.remote(install_sigterm_handler))


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: its place in the job from Ray's context, then the same process as every launcher."""
    train = import_extra("ray.train")
    ray_torch = import_extra("ray.train.torch")
    from launch.orchestration.worker import train_process
    from trainer.dist import DistContext

    cfg = config_from_dict(loop_config["config"], "the Ray driver")
    _quiet_report_log()
    context = train.get_context()
    # The device Ray assigned to this worker: every worker on a node sees all its GPUs, so local_rank is not it.
    ctx = DistContext(rank=context.get_world_rank(), local_rank=context.get_local_rank(),
                      world_size=context.get_world_size(), device=ray_torch.get_device())
    run_dir = Path(loop_config["run_dir"])
    if (run_dir / FATAL_FILE).exists():
        return  # an earlier attempt met an error no restart fixes: end at once, the driver reports it
    _catch_sigterm_in_main_thread()
    try:
        train_process(cfg, ctx, run_dir, launch_id=loop_config["launch_id"], extra_sinks=[RaySink()],
                      print_summary=False)  # the driver prints it
    except NOT_RETRYABLE as error:
        # Ray would restart the group up to launch.max_failures times and meet the error every time. Record
        # it and let this process die: the next attempt ends at once (above), and so does the run. (Ending
        # here normally could leave another rank waiting in a collective for ever.)
        record_fatal(run_dir, ctx.rank, error)
        raise
    except Preempted as error:
        # Ray reports one rank's error; each rank says what its stop took (the one that had the signal, how
        # long after it the checkpoint was committed).
        print(f"run {cfg.launch.name}: rank {ctx.rank} {error}", flush=True)
        raise
