"""Starting and running training processes: the run folder, the launchers (this machine, torchrun, Ray),
the per-process body they all end in, and the run summary.

`start_run` is the one place that chooses the launcher, for `train` and `bench train` alike.
"""

from __future__ import annotations

import os
from pathlib import Path

from configs.errors import ConfigError
from configs.schema import RunConfig
from launch.errors import TrackingIncomplete
from launch.orchestration.summary import SUMMARY_FILE, RunSummary


def start_run(cfg: RunConfig, *, resume: bool = False) -> RunSummary | None:
    """Run `cfg` with its launcher (launch.launcher): a new run, or with `resume` the existing run of cfg's
    name. Returns the summary, printed as a table; None on the ranks of a torchrun job other than rank 0.
    Raises `TrackingIncomplete` after a run whose tracking or registration failed (its summary says what)."""
    if cfg.launch.launcher == "ray":
        if "TORCHELASTIC_RUN_ID" in os.environ:
            raise ConfigError("started by torchrun with launch.launcher='ray': add --launcher torchrun")
        from launch.orchestration.ray_launcher import run_ray

        summary: RunSummary | None = run_ray(cfg, resume=resume)
    else:
        from launch.orchestration.local import run_local

        summary = run_local(cfg, resume=resume)
    if summary is not None and summary.tracking_error is not None:
        raise TrackingIncomplete(f"{summary.tracking_error}; the checkpoint {summary.checkpoint_url} is safe "
                                 f"(summary: {Path(summary.run_dir) / SUMMARY_FILE})")
    return summary


__all__ = ["RunSummary", "start_run"]
