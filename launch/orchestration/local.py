"""The launcher on this machine: one process (its first GPU or its CPU), or each of the processes that
`torchrun` starts (it sets RANK, LOCAL_RANK and WORLD_SIZE; the process group then comes from the env)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from configs.schema import RunConfig
from launch.orchestration.rundir import open_run_dir
from launch.orchestration.summary import RunSummary
from launch.orchestration.worker import train_process
from trainer.dist import DistContext, init_distributed, is_distributed, single_process_context
from trainer.lease import new_launch_id


def run_local(cfg: RunConfig, *, resume: bool = False) -> RunSummary | None:
    """Train in this process (a new run, or with `resume` the existing run of cfg's name); on the primary one
    print a summary table and return the summary saved with the run (None on other ranks)."""
    ctx = _context_from_environment(cfg.distributed.timeout_s)
    try:
        return _run(cfg, ctx, resume=resume)
    finally:
        if is_distributed():
            torch.distributed.destroy_process_group()


def _context_from_environment(timeout_s: float) -> DistContext:
    if "WORLD_SIZE" not in os.environ:
        return single_process_context()
    return init_distributed(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout_s=timeout_s)


def _run(cfg: RunConfig, ctx: DistContext, *, resume: bool) -> RunSummary | None:
    # Rank 0 names the run and makes its folder; the others take its resolved config, so that every rank
    # agrees on the run name and checkpoint URL (generated names contain the time).
    resolved: list[RunConfig | None] = [None]
    failure: Exception | None = None
    if ctx.is_primary:
        try:
            resolved[0], _ = open_run_dir(cfg, resume=resume)
        except (FileExistsError, FileNotFoundError) as error:
            failure = error
    if is_distributed():
        torch.distributed.broadcast_object_list(resolved, src=0)
    if failure is not None:
        raise failure
    if resolved[0] is None:
        raise FileExistsError("rank 0 could not create the run folder (see its error)")
    cfg = resolved[0]
    # Only the primary claims the checkpoint URL: the other ranks' launch ids go unused.
    return train_process(cfg, ctx, Path(cfg.launch.runs_dir) / str(cfg.launch.name), launch_id=new_launch_id())
