"""The training loop: one step, read top to bottom, and the epochs around it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from configs.schema import RunConfig
from data_pipeline import Loaders
from trainer.evaluate import evaluate
from trainer.metrics import MetricSink
from trainer.precision import Precision
from trainer.schedule import learning_rate


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
    """Epochs trained."""
    steps: int
    """Optimiser steps taken."""
    train_images: int
    """Images the model trained on (epochs x steps per epoch x batch)."""
    train_time_s: float
    """Wall time of the training steps, evaluation excluded."""
    val: dict[str, float]
    """The last evaluation: val_loss, val_top1, val_top5, val_images."""

    @property
    def images_per_s(self) -> float:
        """Measured training throughput of this process."""
        return self.train_images / self.train_time_s


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


def train(state: TrainState, loaders: Loaders, cfg: RunConfig, *, peak_lr: float,
          sinks: Sequence[MetricSink]) -> TrainResult:
    """Run cfg.schedule.epochs epochs: per step set the lr, step, maybe report; per epoch evaluate and report."""
    device = state.precision.device
    memory_format = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
    steps_per_epoch = len(loaders.train)
    total_steps = cfg.schedule.epochs * steps_per_epoch
    step, train_time_s, train_images = 0, 0.0, 0
    val: dict[str, float] = {}
    for epoch in range(cfg.schedule.epochs):
        state.model.train()
        loss_sum = torch.zeros((), device=device)
        interval_steps, interval_images = 0, 0
        interval_start = time.perf_counter()
        for images, labels in loaders.train:
            lr = learning_rate(step, peak_lr=peak_lr, steps_per_epoch=steps_per_epoch, cfg=cfg.schedule)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            loss_sum += train_step(state, images, labels)
            step += 1
            interval_steps += 1
            interval_images += labels.shape[0]
            if step % cfg.tracking.log_interval_steps == 0 or step % steps_per_epoch == 0:
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
                        "eta_s": (total_steps - step) * train_time_s / step,
                    }, step)
                loss_sum.zero_()
                interval_steps, interval_images = 0, 0
                interval_start = time.perf_counter()
        val = evaluate(state.model, loaders.val, state.precision, channels_last=cfg.precision.channels_last)
        for sink in sinks:
            sink.log({"epoch": epoch + 1, **val}, step)
    return TrainResult(epochs=cfg.schedule.epochs, steps=step, train_images=train_images,
                       train_time_s=train_time_s, val=val)
