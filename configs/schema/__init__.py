"""The run configuration: one frozen tree of typed sections.

Defaults are the standard ImageNet ResNet-50 recipe (He et al. 2015 with the Goyal et al. 2017
large-batch rules); a YAML recipe in this folder changes only what differs. Each section checks its
own values when built, so an impossible setting fails before any work starts; the loader adds the
file or override the value came from.

One module per group of sections (configs/schema/*.py); everything is importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from configs.errors import IncompatibleSettings
from configs.schema.base import RESERVED_ALIAS, CompileMode, InvalidValue, ModelName, require
from configs.schema.data import DataConfig
from configs.schema.launch import LaunchConfig
from configs.schema.model import ModelConfig
from configs.schema.outputs import CheckpointConfig, TrackingConfig
from configs.schema.training import DistributedConfig, OptimConfig, PrecisionConfig, ScheduleConfig


DEPRECATED_KEYS = {
    "data.num_workers": "it meant DALI's CPU threads for data.loader=dali and the DataLoader's processes for "
                        "data.loader=torch (beside launch.num_workers, the Ray workers); set data.dali_threads "
                        "and data.loader_workers instead",
}
"""Keys still read, with why they went: `renamed_values` says what each stands for now."""


def renamed_values(key: str, value: Any) -> dict[str, Any]:
    """What deprecated `key` set to `value` stands for now (an explicit setting of a new key wins over it)."""
    if key == "data.num_workers":
        # DALI ran max(1, num_workers) threads.
        return {"data.dali_threads": max(1, value) if isinstance(value, int) else value, "data.loader_workers": value}
    raise KeyError(key)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything one training run needs, section by section."""

    seed: int = 0
    """Seed of every random number generator (weights, shuffling, augmentation)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        require(self.tracking.register_weights != "ema" or self.optim.ema_decay > 0, "tracking.register_weights",
                 self.tracking.register_weights, "needs optim.ema_decay > 0 (no average of the weights is kept)")
        require(self.tracking.register_weights != "average" or self.checkpoint.keep_last >= self.tracking.average_last,
                 "checkpoint.keep_last", self.checkpoint.keep_last,
                 f"must be >= tracking.average_last={self.tracking.average_last} to average that many checkpoints")
        launch = self.launch
        if launch.elastic:
            require(launch.launcher == "ray", "launch.num_workers", launch.num_workers,
                     "is a range, which needs launch.launcher='ray' (torchrun starts a fixed number of processes)")
            require(self.distributed.strategy == "ddp", "launch.num_workers", launch.num_workers,
                     "is a range, which needs distributed.strategy='ddp' (a DeepSpeed ZeRO checkpoint only "
                     "reloads at the world size that wrote it)")
            micro_batches = self.micro_batches_per_step
            sizes = range(launch.min_workers, launch.max_workers + 1)
            working = [size for size in range(1, launch.max_workers + 1) if micro_batches % size == 0]
            require(all(micro_batches % size == 0 for size in sizes), "launch.num_workers", launch.num_workers,
                     f"includes world sizes that do not divide the {micro_batches} micro-batches of "
                     f"data.batch_size={self.data.batch_size} images in each step (max workers x "
                     f"optim.accumulation_steps); sizes that do: {working}: choose a range of those, or change "
                     "optim.accumulation_steps")

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches of data.batch_size images in one optimiser step of all ranks together, at the (max)
        number of workers: launch.max_workers x optim.accumulation_steps."""
        return self.launch.max_workers * self.optim.accumulation_steps

    def global_batch_size(self, world_size: int) -> int:
        """Images in one optimiser step of all ranks together at `world_size`: data.batch_size x world size x
        the micro-batches each rank accumulates (with a range of workers the same at every size)."""
        return self.data.batch_size * world_size * self.accumulation_steps_for(world_size)

    def accumulation_steps_for(self, world_size: int) -> int:
        """Micro-batches each rank accumulates per step at `world_size`: optim.accumulation_steps, or with a
        range of workers what keeps the global batch at max workers' (data.batch_size x max x accumulation)."""
        if not self.launch.elastic:
            return self.optim.accumulation_steps
        micro_batches = self.micro_batches_per_step
        if micro_batches % world_size:
            sizes = f"[{self.launch.min_workers}, {self.launch.max_workers}]"
            raise IncompatibleSettings(f"launch.num_workers={sizes} does not allow {world_size} workers: they "
                                       f"cannot share {micro_batches} micro-batches per step evenly")
        return micro_batches // world_size


__all__ = ["DEPRECATED_KEYS", "RESERVED_ALIAS", "CheckpointConfig", "CompileMode", "DataConfig", "DistributedConfig",
           "InvalidValue", "LaunchConfig", "ModelConfig", "ModelName", "OptimConfig", "PrecisionConfig", "RunConfig",
           "ScheduleConfig", "TrackingConfig", "renamed_values"]
