"""launch.*: how the job is started and where its outputs go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from configs.schema.base import require


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchConfig:
    """How the job is started and where its outputs go."""

    launcher: Literal["ray", "torchrun"] = "ray"
    """ray: `num_workers` Ray Train workers on a Ray cluster (joined, or started on this machine), restarted
    after failures; torchrun: this process, or each of the processes `torchrun` starts."""
    runs_dir: str = "runs"
    """Folder holding one sub-folder per run (resolved config, metrics, summary, checkpoints); on a multi-node
    Ray cluster it must be storage every node sees (a shared file system)."""
    name: str | None = None
    """Run name, the sub-folder under runs_dir; None: <model>-<UTC time>."""
    num_workers: int | tuple[int, int] = 1
    """Ray: training processes (one per GPU on GPU clusters); or a range [min, max] for elastic training: Ray
    starts with as many as it can get (at least min), shrinks after a failure, and grows back when resources
    return. The global batch stays data.batch_size x max x optim.accumulation_steps at every size: each rank
    accumulates max x accumulation_steps / world size micro-batches, so every size in the range must divide
    that number."""
    resize_interval_s: float = 60.0
    """Ray, with a range: how often a healthy group checks whether more workers can be had (growing restarts
    the group from its latest checkpoint)."""
    group_start_timeout_s: float = 60.0
    """Ray: how long a new worker group waits for its workers. After a node is lost, Ray first asks for the
    size it had (the lost node's resources may still be listed) and only after this timeout starts with the
    workers it can get: most of what a shrink costs. Shorter shrinks faster; it must exceed the time a worker
    takes to start (container pulls, data staging happen after it starts)."""
    cpus_per_worker: float = 1.0
    """Ray: CPUs reserved per worker, for the step and its data loading (DALI threads or DataLoader processes);
    Ray also sets OMP_NUM_THREADS to it."""
    gpus_per_worker: float = 0.0
    """Ray: GPUs per worker (1 on GPU clusters; 0 trains on CPUs with gloo)."""
    max_failures: int = 3
    """Ray: worker-group failures (a dead process or node, a preemption) after which the run is restarted from
    its latest checkpoint; one more ends the run with an error naming that checkpoint."""
    preempt_grace_s: float = 30.0
    """The time a preempted node gets between SIGTERM and SIGKILL (GCP's spot VMs: 30 s; AWS spot: 120 s;
    Kubernetes: terminationGracePeriodSeconds). On SIGTERM every rank stops two or three steps later at the same
    step and commits a checkpoint there; the message says how long that took, and warns when it took longer
    than this (keep one step plus one checkpoint write well under it)."""
    ray_address: str | None = None
    """Ray: the cluster to join ("auto", "host:6379", "ray://host:10001"); None: $RAY_ADDRESS if set, else a
    new single-machine cluster bound to 127.0.0.1."""

    def __post_init__(self) -> None:
        require(self.name is None or (self.name != "" and "/" not in self.name), "name", self.name,
                 "must be a non-empty folder name without '/'")
        require(self.min_workers >= 1 and self.min_workers <= self.max_workers, "num_workers", self.num_workers,
                 "must be >= 1, or a range [min, max] with 1 <= min <= max")
        require(self.resize_interval_s > 0, "resize_interval_s", self.resize_interval_s, "must be > 0")
        require(self.group_start_timeout_s > 0, "group_start_timeout_s", self.group_start_timeout_s, "must be > 0")
        require(self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker, "must be > 0")
        require(self.gpus_per_worker >= 0, "gpus_per_worker", self.gpus_per_worker, "must be >= 0")
        require(self.max_failures >= 0, "max_failures", self.max_failures, "must be >= 0")
        require(self.preempt_grace_s > 0, "preempt_grace_s", self.preempt_grace_s, "must be > 0")

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains with (num_workers, or the range's min)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """The most workers the run trains with (num_workers, or the range's max): the global batch's reference."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        """A range of sizes: the world size may change between starts of the run."""
        return self.min_workers != self.max_workers
