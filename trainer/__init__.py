"""The training engine. `run(cfg, ctx, sinks)` is the one entry point every launcher calls."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from configs.loader import ConfigError
from configs.schema import RunConfig, TrackingConfig
from data_pipeline import build_loaders
from data_pipeline.fs import open_storage
from trainer.checkpoint import CheckpointManager
from trainer.dist import DistContext
from trainer.loop import TrainResult, train
from trainer.metrics import MetricSink
from trainer.models import build_model
from trainer.optim import build_optimizer, peak_learning_rate
from trainer.precision import resolve_precision
from trainer.preempt import watch_for_preemption
from trainer.strategy import build_strategy

__all__ = ["DistContext", "MetricSink", "TrainResult", "run"]


def run(cfg: RunConfig, ctx: DistContext, sinks: Sequence[MetricSink]) -> TrainResult:
    """Train and evaluate the configured model on this process's share of the job."""
    _warn_unused(cfg)
    torch.manual_seed(cfg.seed)
    loaders = build_loaders(cfg.data, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
                            pin_memory=ctx.device.type == "cuda")
    if len(loaders.classes) != cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data set at data.root={cfg.data.root!r} "
                         f"has {len(loaders.classes)} classes")
    if len(loaders.train) < cfg.optim.accumulation_steps:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} x {ctx.world_size} workers x "
                          f"optim.accumulation_steps={cfg.optim.accumulation_steps} is larger than the training set "
                          f"({loaders.num_train_images} images): no full step to train on")
    if cfg.distributed.strategy == "none" and ctx.world_size > 1:
        raise ConfigError(f"distributed.strategy='none' but {ctx.world_size} processes were launched: use 'ddp'")
    # The wrapping chain, in this order: device -> channels-last -> strategy (DDP wraps the final module).
    model = apply_device_and_layout(build_model(cfg.model), ctx.device, channels_last=cfg.precision.channels_last)
    precision = resolve_precision(cfg.precision, ctx.device)
    global_batch_size = cfg.data.batch_size * ctx.world_size * cfg.optim.accumulation_steps
    peak_lr = peak_learning_rate(cfg.optim, global_batch_size=global_batch_size)
    optimizer = build_optimizer(model, cfg.optim, peak_lr)
    strategy = build_strategy(model, optimizer, precision.grad_scaler(), cfg.distributed, ctx)
    checkpoints = None
    if cfg.checkpoint.url is not None:
        checkpoints = CheckpointManager(open_storage(cfg.checkpoint.url), keep_last=cfg.checkpoint.keep_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    with watch_for_preemption() as preemption:
        return train(strategy, precision, criterion, loaders, cfg, ctx=ctx, peak_lr=peak_lr,
                     global_batch_size=global_batch_size, sinks=sinks, checkpoints=checkpoints, preemption=preemption)


def apply_device_and_layout(model: nn.Module, device: torch.device, *, channels_last: bool) -> nn.Module:
    """Move the model to its device, then (if asked) to NHWC: the format oneDNN and tensor cores run fastest."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _warn_unused(cfg: RunConfig) -> None:
    """MLflow tracking is validated but not built yet: say so if the config sets it."""
    default = TrackingConfig()
    if (cfg.tracking.uri, cfg.tracking.experiment) != (default.uri, default.experiment):
        warnings.warn("tracking.uri/experiment are set but this version has no MLflow tracking yet; "
                      "they have no effect", stacklevel=2)
