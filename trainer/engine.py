"""The engine's assembly: `run(cfg, ctx, sinks)` builds data, model, strategy and the loop's components from
the config, then trains. Every launcher ends here."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from configs.errors import IncompatibleSettings
from configs.schema import CompileMode, DistributedConfig, PrecisionConfig, RunConfig
from data_pipeline import Loaders, build_loaders
from trainer.cadence import Cadence
from trainer.checkpoint import open_checkpoints
from trainer.dist import DistContext, init_device
from trainer.ema import Ema
from trainer.init import apply_initial_state
from trainer.lease import Claimant, hold_writer_lease
from trainer.loop import Learner, TrainResult, train
from trainer.losses import build_criterion
from trainer.meter import IntervalMeter
from trainer.metrics import MetricSink
from trainer.mix import BatchMixer
from trainer.models import DropPathSeeds, build_model
from trainer.optim import build_optimizer, peak_learning_rate
from trainer.precision import resolve_compile, resolve_precision
from trainer.preempt import watch_for_preemption
from trainer.state import Checkpointer
from trainer.strategy import build_strategy
from trainer.strategy.single import bare_module
from trainer.time_to_accuracy import TimeToAccuracy


def run(cfg: RunConfig, ctx: DistContext, sinks: Sequence[MetricSink], *,
        extra_meta: Callable[[], dict[str, Any]] | None = None, claimant: Claimant | None = None,
        initial_state: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """Train and evaluate the configured model on this process's share of the job. `extra_meta` (on the
    primary process) adds facts to each checkpoint's manifest, such as the tracking run to continue.
    `claimant`: the run that holds checkpoint.url while it trains (one writer per URL; see trainer/lease.py).
    `initial_state`: the weights of model.init_from, which the launcher loads (a resumed run's checkpoint
    replaces them)."""
    if (cfg.model.init_from is None) != (initial_state is None):
        raise IncompatibleSettings("model.init_from and the weights the launcher loads from it go together: "
                                   f"init_from={cfg.model.init_from!r}, weights given: {initial_state is not None}")
    target = () if cfg.schedule.target_top1 is None else (cfg.schedule.target_top1,)
    clock = TimeToAccuracy(thresholds=tuple(sorted({*cfg.tracking.top1_thresholds, *target})),
                           world_size=ctx.world_size)  # the run's time counts from here
    seed_everything(cfg.seed)
    apply_device_settings(ctx.device, cfg.precision)
    precision = resolve_precision(cfg.precision, ctx.device)
    loaders = build_loaders(cfg.data, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
                            dtype=precision.input_dtype)
    check_data(cfg, ctx, loaders)
    check_distributed(cfg, ctx)
    # With a range of workers, the micro-batches per rank follow the world size and the global batch stays.
    accumulation_steps = cfg.accumulation_steps_for(ctx.world_size)
    global_batch_size = cfg.global_batch_size(ctx.world_size)
    peak_lr = peak_learning_rate(cfg.optim, global_batch_size=global_batch_size)
    # DeepSpeed needs its parameters in the default layout (see trainer/strategy/deepspeed.py); the inputs
    # stay channels-last, so the convolutions still run in NHWC.
    network = build_model(cfg.model)
    if initial_state is not None:
        done = apply_initial_state(network, initial_state, source=str(cfg.model.init_from))
        if ctx.is_primary:
            print(f"model.init_from: {done}", flush=True)
    model = prepare_model(network, ctx.device,
                          channels_last=cfg.precision.channels_last and cfg.distributed.strategy != "deepspeed",
                          sync_batchnorm=cfg.distributed.sync_batchnorm and ctx.world_size > 1,
                          compile_mode=resolve_compile(cfg.precision, ctx.device, strategy=cfg.distributed.strategy))
    optimizer = build_optimizer(bare_module(model), cfg.optim, peak_lr)
    ema = Ema(bare_module(model), cfg.optim.ema_decay) if cfg.optim.ema_decay else None
    strategy = build_strategy(model, optimizer, precision.grad_scaler(), cfg.distributed, ctx,
                              micro_batch_size=cfg.data.batch_size, accumulation_steps=accumulation_steps,
                              clip_grad_norm=cfg.optim.clip_grad_norm)
    learner = Learner(strategy=strategy, ema=ema, precision=precision,
                      criterion=build_criterion(cfg.optim, num_classes=cfg.model.num_classes),
                      channels_last=cfg.precision.channels_last, accumulation_steps=accumulation_steps,
                      flip_average=cfg.data.val_flip_average,
                      mixer=BatchMixer(cfg.data, num_classes=cfg.model.num_classes, seed=cfg.seed),
                      drop_path=DropPathSeeds(cfg.seed, ctx.rank) if cfg.model.drop_path_rate else None)
    cadence = Cadence(schedule=cfg.schedule, steps_per_epoch=len(loaders.train) // accumulation_steps,
                      accumulation_steps=accumulation_steps, peak_lr=peak_lr,
                      log_interval_steps=cfg.tracking.log_interval_steps,
                      checkpoint_interval_steps=cfg.checkpoint.interval_steps)
    manager = open_checkpoints(cfg.checkpoint.url, keep_last=cfg.checkpoint.keep_last) if cfg.checkpoint.url else None
    with (hold_writer_lease(manager.storage if manager is not None else None, claimant, ctx,
                            timeout_s=cfg.checkpoint.lease_timeout_s) as lease,
          watch_for_preemption(cfg.launch.preempt_grace_s) as preemption):
        checkpointer = Checkpointer(manager=manager, cfg=cfg, strategy=strategy, ema=ema, ctx=ctx, sinks=sinks,
                                    steps_per_epoch=cadence.steps_per_epoch, global_batch_size=global_batch_size,
                                    classes=loaders.classes, extra_meta=extra_meta, lease=lease)
        meter = IntervalMeter(ctx.device, learner.running_stats(), world_size=ctx.world_size,
                              max_nonfinite_steps=cfg.optim.max_nonfinite_steps, preemption=preemption)
        return train(learner, loaders, cadence, meter, checkpointer, sinks, clock)


def prepare_model(model: nn.Module, device: torch.device, *, channels_last: bool, sync_batchnorm: bool = False,
                  compile_mode: CompileMode | None = None) -> nn.Module:
    """The fixed chain every user of a network applies, in this order: to `device` -> channels-last (NHWC,
    the format oneDNN and tensor cores run fastest) -> SyncBatchNorm -> torch.compile. The strategy's
    wrapper (DDP or DeepSpeed) comes last, in `build_strategy`; `bare_module` undoes compile. `compile_mode`:
    torch.compile's mode, None for no compile (see `resolve_compile`)."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if compile_mode is not None:
        model = torch.compile(model, mode=compile_mode)  # type: ignore[assignment]
    return model


def apply_device_settings(device: torch.device, cfg: PrecisionConfig) -> None:
    """On a GPU: make `device` the current one (what nccl, DALI and any library that asks for "the" GPU
    then use), and set TF32 and cuDNN autotuning as configured. Nothing on CPUs."""
    if device.type != "cuda":
        return
    init_device(device)  # a context built by a launcher other than trainer.dist's own (Ray's)
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark


def seed_everything(seed: int) -> None:
    """Seed the global generators of torch (CPU and GPUs), numpy and python: the model's initial weights come
    from torch's, and code beside the trainer (a sink, a user's module) starts the same way every run."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def check_data(cfg: RunConfig, ctx: DistContext, loaders: Loaders) -> None:
    """Refuse a data set that does not fit the model or has no full step to train on, before any work."""
    if len(loaders.classes) != cfg.model.num_classes:
        source = ("data.synthetic_classes" if cfg.data.dataset == "synthetic"
                  else f"the data set at data.root={cfg.data.root!r}")
        raise IncompatibleSettings(f"model.num_classes={cfg.model.num_classes} but {source} has "
                                   f"{len(loaders.classes)} classes")
    accumulation_steps = cfg.accumulation_steps_for(ctx.world_size)
    if len(loaders.train) < accumulation_steps:
        raise IncompatibleSettings(
            f"data.batch_size={cfg.data.batch_size} x {ctx.world_size} workers x {accumulation_steps} accumulated "
            f"micro-batches is larger than the training set ({loaders.num_train_images} images): "
            "no full step to train on")


def check_distributed(cfg: RunConfig, ctx: DistContext) -> None:
    """Refuse strategy settings that cannot work on this launch, before any work."""
    strategy = cfg.distributed.strategy
    if strategy == "none" and ctx.world_size > 1:
        raise IncompatibleSettings(
            f"distributed.strategy='none' but {ctx.world_size} processes were launched: use 'ddp'")
    if cfg.distributed.sync_batchnorm and ctx.device.type != "cuda":
        raise IncompatibleSettings("distributed.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm has no CPU "
                                   "kernels); set it to false")
    if strategy == "deepspeed":
        if cfg.precision.dtype == "fp16":
            raise IncompatibleSettings(
                "precision.dtype='fp16' with distributed.strategy='deepspeed': DeepSpeed's loss scaling comes "
                "with its fp16 mode, which casts BatchNorm to half; use bf16 (or ddp for fp16)")
        if cfg.optim.name == "lars" or (cfg.optim.name == "lamb" and cfg.distributed.zero_stage > 0):
            raise IncompatibleSettings(
                f"optim.name={cfg.optim.name!r} with distributed.strategy='deepspeed' and "
                f"zero_stage={cfg.distributed.zero_stage}: ZeRO flattens parameters into partitions, so the "
                "layer-wise trust ratio cannot see whole layers; use distributed.strategy='ddp'"
                + (" or zero_stage=0" if cfg.optim.name == "lamb" else ""))
        if cfg.precision.compile is True:
            raise IncompatibleSettings("precision.compile=true with distributed.strategy='deepspeed' is not "
                                       "supported; use ddp to compile")
    if strategy != "deepspeed" and cfg.distributed.zero_stage != DistributedConfig().zero_stage:
        warnings.warn(f"distributed.zero_stage has no effect with distributed.strategy={strategy!r}", stacklevel=3)
