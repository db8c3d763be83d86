"""Run configuration: the typed schema, the YAML loader and the shipped recipes (`*.yaml`)."""

from configs.errors import ConfigError, IncompatibleSettings, UserError
from configs.loader import CONFIG_DIR, config_to_dict, dump_config, load_config, resolve_config_path
from configs.schema import (
    CheckpointConfig, DataConfig, DistributedConfig, LaunchConfig, ModelConfig, OptimConfig, PrecisionConfig,
    RunConfig, ScheduleConfig, TrackingConfig,
)

__all__ = [
    "CONFIG_DIR", "CheckpointConfig", "ConfigError", "DataConfig", "DistributedConfig", "IncompatibleSettings",
    "LaunchConfig", "ModelConfig", "OptimConfig", "PrecisionConfig", "RunConfig", "ScheduleConfig", "TrackingConfig",
    "UserError", "config_to_dict", "dump_config", "load_config", "resolve_config_path",
]
