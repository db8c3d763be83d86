"""The training loop: one step, read top to bottom, and the epochs around it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from configs.schema import RunConfig
from data_pipeline import Loaders
from trainer.checkpoint import CheckpointManager
from trainer.evaluate import evaluate
from trainer.metrics import MetricSink
from trainer.precision import Precision
from trainer.schedule import learning_rate
from trainer.state import check_compatible, checkpoint_meta, load_state, save_state


@dataclass(frozen=True, slots=True)
class TrainState:
    """The objects a training step changes."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    criterion: nn.Module


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a finished run measured."""

    epochs: int
    """Epochs of the schedule."""
    start_step: int
    """The step this process resumed from (0 for a fresh run)."""
    steps: int
    """The global step reached: optimiser steps since the run began, across restarts."""
    train_images: int
    """Images this process trained on (since start_step)."""
    train_time_s: float
    """Wall time of the training steps, evaluation excluded."""
    val: dict[str, float]
    """The last evaluation: val_loss, val_top1, val_top5, val_images."""

    @property
    def images_per_s(self) -> float:
        """Measured training throughput of this process (0 when it resumed an already finished run)."""
        return self.train_images / self.train_time_s if self.train_time_s else 0.0


def train_step(state: TrainState, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Forward, backward and update on one batch; returns the loss, still on the device (no host sync)."""
    with state.precision.autocast():
        logits = state.model(images)
        loss = state.criterion(logits, labels)
    state.optimizer.zero_grad(set_to_none=True)
    # The scaler is a pass-through unless the precision is fp16.
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return loss.detach()


def train(state: TrainState, loaders: Loaders, cfg: RunConfig, *, peak_lr: float, global_batch_size: int,
          rank: int, sinks: Sequence[MetricSink], checkpoints: CheckpointManager | None) -> TrainResult:
    """Resume from the latest checkpoint if there is one, then per step: set the lr, step, maybe checkpoint,
    maybe report; per epoch: evaluate, report, checkpoint."""
    device = state.precision.device
    memory_format = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
    steps_per_epoch = len(loaders.train)
    total_steps = cfg.schedule.epochs * steps_per_epoch
    val: dict[str, float] = {}
    start_step = 0
    if checkpoints is not None and (manifest := checkpoints.latest()) is not None:
        check_compatible(manifest, checkpoints.url(manifest.step), cfg, global_batch_size=global_batch_size)
        load_state(checkpoints, manifest, model=state.model, optimizer=state.optimizer, scaler=state.scaler,
                   rank=rank)
        start_step = manifest.step
        val = {k: v for k, v in manifest.meta.items() if k.startswith("val_")}

    def save(step: int, val: dict[str, float] | None) -> None:
        if checkpoints is None:
            return
        meta = checkpoint_meta(cfg, step=step, steps_per_epoch=steps_per_epoch,
                               global_batch_size=global_batch_size, val=val)
        save_state(checkpoints, step, model=state.model, optimizer=state.optimizer, scaler=state.scaler,
                   rank=rank, meta=meta)

    step, train_time_s, train_images = start_step, 0.0, 0
    for epoch in range(start_step // steps_per_epoch, cfg.schedule.epochs):
        state.model.train()
        loss_sum = torch.zeros((), device=device)
        interval_steps, interval_images = 0, 0
        interval_start = time.perf_counter()
        for images, labels in loaders.train.iter_epoch(epoch, start_batch=step - epoch * steps_per_epoch):
            lr = learning_rate(step, peak_lr=peak_lr, steps_per_epoch=steps_per_epoch, cfg=cfg.schedule)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            loss_sum += train_step(state, images, labels)
            step += 1
            interval_steps += 1
            interval_images += labels.shape[0]
            end_of_epoch = step % steps_per_epoch == 0
            if cfg.checkpoint.interval_steps and step % cfg.checkpoint.interval_steps == 0 and not end_of_epoch:
                save(step, None)  # epoch ends save after evaluation, below
            if step % cfg.tracking.log_interval_steps == 0 or end_of_epoch:
                mean_loss = (loss_sum / interval_steps).item()  # the host sync that makes the timing honest
                elapsed_s = time.perf_counter() - interval_start
                train_time_s += elapsed_s
                train_images += interval_images
                for sink in sinks:
                    sink.log({
                        "epoch": step / steps_per_epoch,
                        "loss": mean_loss,
                        "lr": lr,
                        "images_per_s": interval_images / elapsed_s,
                        "eta_s": (total_steps - step) * train_time_s / (step - start_step),
                    }, step)
                loss_sum.zero_()
                interval_steps, interval_images = 0, 0
                interval_start = time.perf_counter()
        val = evaluate(state.model, loaders.val, state.precision, channels_last=cfg.precision.channels_last)
        for sink in sinks:
            sink.log({"epoch": epoch + 1, **val}, step)
        save(step, val)
    return TrainResult(epochs=cfg.schedule.epochs, start_step=start_step, steps=step, train_images=train_images,
                       train_time_s=train_time_s, val=val)
