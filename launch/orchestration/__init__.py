"""Starting and running training processes: the run folder, the launchers (this machine, torchrun, Ray),
the per-process body they all end in, and the run summary.

`start_run` is the one place that chooses the launcher, for `train` and `bench train` alike.
"""

from __future__ import annotations

import json
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
    check_outputs_outlive_a_ray_job(cfg)
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


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for a submitted job's entrypoint: its runtime environment, as JSON."""


def ray_job_working_dir() -> Path | None:
    """The copy of the submitter's working directory that a `ray job submit --working-dir` job runs in (Ray
    unpacks it into a temporary folder of its session and deletes it later); None outside such a job."""
    try:
        runtime_env = json.loads(os.environ.get(RAY_JOB_ENV, "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return Path.cwd() if runtime_env.get("working_dir") else None


def check_outputs_outlive_a_ray_job(cfg: RunConfig) -> None:
    """Refuse, inside a Ray job's working-directory copy, local paths that are relative: the run folder,
    checkpoints, MLflow store and data set would be written into that temporary copy, out of the user's
    reach (no `train --resume` could find them)."""
    copy = ray_job_working_dir()
    if copy is None:
        return
    places = {"launch.runs_dir": cfg.launch.runs_dir, "checkpoint.url": cfg.checkpoint.url,
              "tracking.uri": cfg.tracking.uri, "data.root": cfg.data.root}
    relative = [f"{key}={value!r}" for key, value in places.items() if value is not None and _relative_path(value)]
    if relative:
        raise ConfigError(
            f"this is a Ray job running in Ray's temporary copy of the submitted working directory ({copy}), and "
            f"{', '.join(relative)} would write there, where no later `train --resume` finds it; pass absolute "
            "paths on storage every node sees (or URLs), e.g. launch.runs_dir=/shared/runs "
            "data.root=/shared/data/digits (the MLflow store then goes under launch.runs_dir unless tracking.uri "
            "says otherwise)")


def _relative_path(value: str) -> bool:
    """Whether `value` is a relative local path (a plain path, file: or sqlite:/// URI); URLs are not."""
    for scheme in ("sqlite:///", "file://", "file:"):
        if value.startswith(scheme):
            return not os.path.isabs(value.removeprefix(scheme))
    return "://" not in value and not os.path.isabs(os.path.expanduser(value))


__all__ = ["RunSummary", "start_run"]
