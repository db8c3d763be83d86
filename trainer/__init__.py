"""The training engine. `run(cfg, ctx, sinks)` is the one entry point every launcher calls; it is assembled
in `trainer.engine`."""

from trainer.dist import DistContext
from trainer.engine import prepare_model, run
from trainer.loop import TrainResult
from trainer.meter import TrainingDiverged
from trainer.metrics import MetricSink

__all__ = ["DistContext", "MetricSink", "TrainResult", "TrainingDiverged", "prepare_model", "run"]
