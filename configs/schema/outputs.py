"""checkpoint.*, tracking.*: what a run keeps and reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from configs.schema.base import RESERVED_ALIAS, require


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointConfig:
    """Where and how often the run is saved; a run always resumes from the newest complete checkpoint there."""

    url: str | None = None
    """Folder (path or fsspec URL) of the run's checkpoints; the launcher sets None to <run dir>/checkpoints."""
    interval_steps: int = 0
    """Also save every this many steps within an epoch; 0: only at the end of each epoch."""
    keep_last: int = 3
    """How many of the newest checkpoints to keep (the best one is kept as well)."""
    lease_timeout_s: float = 300.0
    """A run holds its checkpoint URL (one writer per URL) and renews its claim every tenth of this; a claim
    not renewed for this long is taken over by the next run that wants the URL."""

    def __post_init__(self) -> None:
        require(self.interval_steps >= 0, "interval_steps", self.interval_steps, "must be >= 0")
        require(self.keep_last >= 1, "keep_last", self.keep_last, "must be >= 1")
        require(self.lease_timeout_s > 0, "lease_timeout_s", self.lease_timeout_s, "must be > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrackingConfig:
    """What the run reports and to whom."""

    log_interval_steps: int = 50
    """Report loss, lr and images/s every this many steps (the only points where the loop syncs with the device)."""
    enabled: bool = True
    """Record the run in MLflow (extra `mlflow`), from the primary process."""
    uri: str | None = None
    """MLflow tracking URI (http://host:5000 for an `mlflow server`); None: sqlite:///<runs_dir>/mlflow.db with
    artifacts in <runs_dir>/mlartifacts."""
    experiment: str = "resnet"
    """MLflow experiment the runs are grouped under."""
    register: bool = True
    """At the end of the run, register its model (register_weights) as a new version of `model_name` in the MLflow
    registry."""
    register_weights: Literal["final", "best", "ema", "average"] = "final"
    """Which weights are registered: final: the last step's; best: the kept checkpoint with the highest val
    top-1; ema: the last step's exponential moving average (needs optim.ema_decay > 0); average: the mean of
    the last `average_last` committed checkpoints' weights, BatchNorm statistics estimated again over
    `average_bn_batches` training batches (timm's avg_checkpoints + SWA's update_bn). The version's val_*
    tags are the scores of those weights, its `registered_weights` tag says which."""
    average_last: int = 5
    """register_weights=average: how many of the newest committed checkpoints to average (checkpoint.keep_last
    must keep them)."""
    average_bn_batches: int = 100
    """register_weights=average: training batches (of data.batch_size) the BatchNorm statistics are estimated
    over."""
    model_name: str | None = None
    """Registered model the versions go to; None: <model.name>-<data set>, the data set being digits/synthetic
    or the last part of data.root (resnet50-imagenet for /data/imagenet)."""
    promote_alias: str | None = None
    """After registering (not without `register`), move this alias (e.g. staging) to the new version if the
    promotion gate allows: `promote_metric` at least `promote_min` and not below the alias's current holder."""
    promote_metric: str = "val_top1"
    """The version tag the promotion gate compares."""
    promote_min: float | None = None
    """The floor the gate requires of `promote_metric`; None: no floor."""
    promote_eval_data: str | None = None
    """Folder or URL of an indexed data set whose val split the gate scores the new version and the alias's
    holder on at the end of the run (in its primary process), comparing those scores; None: the versions' own
    val tags."""
    promote_max_regression: float = 0.0
    """How far below the holder's metric the new version may be and still take the alias."""
    top1_thresholds: tuple[float, ...] = (0.5, 0.7, 0.75, 0.76, 0.78, 0.9, 0.95, 0.98)
    """Val top-1 levels whose time to accuracy the run records (elapsed time and device-hours of the first
    evaluation reaching each; schedule.target_top1 is always one), in metrics, summary.json and MLflow."""

    def __post_init__(self) -> None:
        require(self.log_interval_steps >= 1, "log_interval_steps", self.log_interval_steps, "must be >= 1")
        require(self.average_last >= 2, "average_last", self.average_last, "must be >= 2")
        require(self.average_bn_batches >= 1, "average_bn_batches", self.average_bn_batches, "must be >= 1")
        thresholds = list(self.top1_thresholds)
        require(thresholds == sorted(set(thresholds)) and all(0 < t <= 1 for t in thresholds), "top1_thresholds",
                 self.top1_thresholds, "must be increasing fractions in (0, 1]")
        require(self.promote_max_regression >= 0, "promote_max_regression", self.promote_max_regression,
                 "must be >= 0")
        require(self.promote_alias is None or RESERVED_ALIAS.match(self.promote_alias) is None, "promote_alias",
                 self.promote_alias, "is reserved by MLflow (v<number>, latest)")
