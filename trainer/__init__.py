"""The training engine. `run(cfg, ctx, sinks)` is the one entry point every launcher calls."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from configs.loader import ConfigError
from configs.schema import DistributedConfig, RunConfig
from data_pipeline import build_loaders
from data_pipeline.fs import open_storage
from trainer.checkpoint import CheckpointManager
from trainer.dist import DistContext
from trainer.ema import Ema
from trainer.loop import TrainResult, train
from trainer.metrics import MetricSink
from trainer.models import build_model
from trainer.optim import build_optimizer, peak_learning_rate
from trainer.precision import resolve_precision
from trainer.preempt import watch_for_preemption
from trainer.strategy import build_strategy

__all__ = ["DistContext", "MetricSink", "TrainResult", "run"]


def run(cfg: RunConfig, ctx: DistContext, sinks: Sequence[MetricSink], *,
        extra_meta: Callable[[], dict[str, Any]] | None = None) -> TrainResult:
    """Train and evaluate the configured model on this process's share of the job. `extra_meta` (on the
    primary process) adds facts to each checkpoint's manifest, such as the tracking run to continue."""
    seed_everything(cfg.seed)
    precision = resolve_precision(cfg.precision, ctx.device)
    loaders = build_loaders(cfg.data, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
                            dtype=precision.input_dtype)
    if len(loaders.classes) != cfg.model.num_classes:
        source = ("data.synthetic_classes" if cfg.data.dataset == "synthetic"
                  else f"the data set at data.root={cfg.data.root!r}")
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but {source} has {len(loaders.classes)} classes")
    if len(loaders.train) < cfg.optim.accumulation_steps:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} x {ctx.world_size} workers x "
                          f"optim.accumulation_steps={cfg.optim.accumulation_steps} is larger than the training set "
                          f"({loaders.num_train_images} images): no full step to train on")
    check_distributed(cfg, ctx)
    # The wrapping chain, in this order: device -> channels-last -> SyncBN -> compile -> DDP or DeepSpeed.
    # DeepSpeed needs its parameters in the default layout (see trainer/strategy/deepspeed.py); the inputs
    # stay channels-last, so the convolutions still run in NHWC.
    channels_last_weights = cfg.precision.channels_last and cfg.distributed.strategy != "deepspeed"
    model = apply_device_and_layout(build_model(cfg.model), ctx.device, channels_last=channels_last_weights)
    if cfg.distributed.sync_batchnorm and ctx.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    global_batch_size = cfg.data.batch_size * ctx.world_size * cfg.optim.accumulation_steps
    peak_lr = peak_learning_rate(cfg.optim, global_batch_size=global_batch_size)
    optimizer = build_optimizer(model, cfg.optim, peak_lr)
    ema = Ema(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
    if cfg.precision.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    strategy = build_strategy(model, optimizer, precision.grad_scaler(), cfg.distributed, ctx,
                              micro_batch_size=cfg.data.batch_size, accumulation_steps=cfg.optim.accumulation_steps)
    checkpoints = None
    if cfg.checkpoint.url is not None:
        checkpoints = CheckpointManager(open_storage(cfg.checkpoint.url), keep_last=cfg.checkpoint.keep_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    with watch_for_preemption() as preemption:
        return train(strategy, ema, precision, criterion, loaders, cfg, ctx=ctx, peak_lr=peak_lr,
                     global_batch_size=global_batch_size, sinks=sinks, checkpoints=checkpoints, preemption=preemption,
                     extra_meta=extra_meta)


def seed_everything(seed: int) -> None:
    """Seed the global generators of torch (CPU and GPUs), numpy and python: the model's initial weights come
    from torch's, and code beside the trainer (a sink, a user's module) starts the same way every run."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def apply_device_and_layout(model: nn.Module, device: torch.device, *, channels_last: bool) -> nn.Module:
    """Move the model to its device, then (if asked) to NHWC: the format oneDNN and tensor cores run fastest."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def check_distributed(cfg: RunConfig, ctx: DistContext) -> None:
    """Refuse strategy settings that cannot work on this launch, before any work."""
    strategy = cfg.distributed.strategy
    if strategy == "none" and ctx.world_size > 1:
        raise ConfigError(f"distributed.strategy='none' but {ctx.world_size} processes were launched: use 'ddp'")
    if cfg.distributed.sync_batchnorm and ctx.device.type != "cuda":
        raise ConfigError("distributed.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU kernels); "
                          "set it to false")
    if strategy == "deepspeed":
        if cfg.precision.dtype == "fp16":
            raise ConfigError("precision.dtype='fp16' with distributed.strategy='deepspeed': DeepSpeed's loss scaling "
                              "comes with its fp16 mode, which casts BatchNorm to half; use bf16 (or ddp for fp16)")
        if cfg.optim.name == "lars":
            raise ConfigError("optim.name='lars' with distributed.strategy='deepspeed': ZeRO flattens parameters, so "
                              "LARS cannot see whole layers; use distributed.strategy='ddp'")
        if cfg.precision.compile:
            raise ConfigError("precision.compile=true with distributed.strategy='deepspeed' is not supported; "
                              "use ddp to compile")
    if strategy != "deepspeed" and cfg.distributed.zero_stage != DistributedConfig().zero_stage:
        warnings.warn(f"distributed.zero_stage has no effect with distributed.strategy={strategy!r}", stacklevel=3)
