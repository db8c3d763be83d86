"""The training loop: one step, read top to bottom, and the epochs around it.

The loop only calls its components, each of which owns one concern: the `Learner` (the model and how a step
updates it), the `Cadence` (what falls due after a step), the `IntervalMeter` (what an interval measured)
and the `Checkpointer` (resume and save).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from data_pipeline import Loader, Loaders
from trainer.cadence import Cadence
from trainer.ema import Ema
from trainer.evaluate import evaluate
from trainer.meter import IntervalMeter, IntervalReport, TrainingDiverged
from trainer.metrics import MetricSink
from trainer.mix import BatchMixer
from trainer.models import DropPathSeeds
from trainer.precision import Precision
from trainer.preempt import Preempted
from trainer.state import Checkpointer
from trainer.strategy import Strategy
from trainer.time_to_accuracy import TimeToAccuracy

__all__ = ["Learner", "TrainResult", "TrainingDiverged", "train", "train_step"]

Batch = tuple[torch.Tensor, torch.Tensor]


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
    """Images trained on by all ranks together since start_step."""
    train_time_s: float
    """Wall time of the training steps, evaluation excluded."""
    val: dict[str, float]
    """The last evaluation: val_loss, val_top1, val_top5, val_images (and ema_val_* with an EMA)."""
    stopped_at_target: bool
    """The run ended at the first evaluation that reached schedule.target_top1, before its last epoch."""
    time_to_accuracy: dict[str, dict[str, float]]
    """Val top-1 threshold ("0.98") -> step, epoch, elapsed_s, device_hours where the run first reached it."""

    @property
    def images_per_s(self) -> float:
        """Measured training throughput of the whole job (0 when it resumed an already finished run)."""
        return self.train_images / self.train_time_s if self.train_time_s else 0.0


def train_step(strategy: Strategy, precision: Precision, criterion: nn.Module, micro_batches: list[Batch], *,
               before_forward: Callable[[int], None] | None = None) -> torch.Tensor:
    """Forward and backward over each micro-batch, then one update; returns the mean loss, on the device.
    `before_forward(i)` runs before micro-batch i's forward pass (seeding stochastic depth)."""
    total_loss = torch.zeros((), device=precision.device)
    for i, (images, labels) in enumerate(micro_batches):
        if before_forward is not None:
            before_forward(i)
        # Gradients are reduced across ranks only on the last micro-batch's backward.
        sync = i == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else strategy.no_sync():
            with precision.autocast():
                loss = criterion(strategy.model(images), labels) / len(micro_batches)
            strategy.backward(loss)
        total_loss += loss.detach()
    strategy.step()
    return total_loss


@dataclass(frozen=True, slots=True)
class Learner:
    """The model being trained and everything one step does to it."""

    strategy: Strategy
    """The wrapped model and its update rule."""
    ema: Ema | None
    """The weight average, if on."""
    precision: Precision
    """Autocast and the device."""
    criterion: nn.Module
    """The training loss."""
    channels_last: bool
    """Whether inputs go to the model in NHWC."""
    accumulation_steps: int
    """Micro-batches per optimiser step."""
    flip_average: bool = False
    """Evaluate on each image and its mirror image, averaging the logits (data.val_flip_average)."""
    mixer: BatchMixer | None = None
    """Mixup/CutMix of the training micro-batches, if on."""
    drop_path: DropPathSeeds | None = None
    """Seeds stochastic depth's draws per micro-batch, if on."""

    def running_stats(self) -> list[torch.Tensor]:
        """The floating buffers of the model and of its weight average: their BatchNorm running averages, which
        a skipped (non-finite) step still moves, and which the meter rolls back."""
        modules = [self.strategy.unwrapped(), *([self.ema.module] if self.ema is not None else [])]
        return [buffer for module in modules for buffer in module.buffers() if buffer.is_floating_point()]

    def set_learning_rate(self, lr: float) -> None:
        """Set the learning rate of every parameter group."""
        for group in self.strategy.optimizer.param_groups:
            group["lr"] = lr

    def next_micro_batches(self, batches: Iterator[Batch]) -> list[Batch]:
        """The next step's micro-batches from `batches`, copied to the device in the model's memory format."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        device = self.precision.device
        return [(images.to(device, non_blocking=True, memory_format=memory_format),
                 labels.to(device, non_blocking=True))
                for images, labels in itertools.islice(batches, self.accumulation_steps)]

    def train_mode(self) -> None:
        """Put the model in training mode (BatchNorm uses and updates batch statistics)."""
        self.strategy.model.train()

    def step(self, micro_batches: list[Batch], *, step: int) -> torch.Tensor:
        """Optimiser step `step` (and the weight average's update), after mixing the micro-batches if
        configured; the mean loss, on the device. A non-finite loss gives non-finite gradients (on every rank,
        once reduced), and the optimizer skips that step on the device; the meter only counts it."""
        if self.mixer is not None:
            micro_batches = self.mixer.mix(micro_batches, step=step)
        seeds = self.drop_path
        loss = train_step(self.strategy, self.precision, self.criterion, micro_batches,
                          before_forward=None if seeds is None else
                          lambda i: seeds.seed_micro_batch(step=step, micro_batch=i))
        if self.ema is not None:
            self.ema.update(self.strategy.unwrapped())
        return loss

    def evaluate(self, loader: Loader) -> dict[str, float]:
        """Scores of the model (and of the weight average, as ema_*) over the whole validation set."""
        self.strategy.sync_buffers()
        val = evaluate(self.strategy.unwrapped(), loader, self.precision, channels_last=self.channels_last,
                       flip_average=self.flip_average)
        if self.ema is not None:
            self.ema.sync_buffers()
            ema_val = evaluate(self.ema.module, loader, self.precision, channels_last=self.channels_last,
                               flip_average=self.flip_average)
            val.update({f"ema_{name}": value for name, value in ema_val.items() if name != "val_images"})
        return val


def train(learner: Learner, loaders: Loaders, cadence: Cadence, meter: IntervalMeter, checkpointer: Checkpointer,
          sinks: Sequence[MetricSink], clock: TimeToAccuracy) -> TrainResult:
    """Resume from the latest checkpoint if there is one, then per step: set the lr, step, and do what falls
    due (report, checkpoint, stop); per epoch: evaluate, report (with the thresholds `clock` saw reached for
    the first time), checkpoint, and end early at the target accuracy. Stops with `Preempted` after a
    checkpoint two or three steps after SIGTERM came to any rank (`StopVote`: all ranks stop at the same step)."""
    resumed = checkpointer.resume()
    clock.restore(resumed.meta)
    start_step, val = resumed.step, resumed.val
    step = start_step
    # A run that already ended at its target (resumed after that) has nothing left to do.
    epochs = range(0) if cadence.reached_target(val) else range(cadence.epoch_of(step), cadence.epochs)
    for epoch in epochs:
        learner.train_mode()
        meter.restart()
        batches = loaders.train.iter_epoch(epoch, start_batch=cadence.first_batch(step))
        stop = False
        while cadence.epoch_of(step) == epoch:
            lr = cadence.learning_rate(step)
            learner.set_learning_rate(lr)
            with meter.waiting_for_data():
                micro_batches = learner.next_micro_batches(batches)
            loss = learner.step(micro_batches, step=step)
            images = sum(labels.shape[0] for _, labels in micro_batches)
            meter.add_step(loss, images=images)
            step += 1
            due = cadence.after(step)
            if step == start_step + 1 and not due.report:
                # The first step compiles and warms up: timed apart, so that images/s is the steady state's.
                meter.set_aside_first_step(images=images)
            stop = meter.stop_agreed()
            if due.report:
                report = meter.report()
                log(sinks, progress(report, step=step, lr=lr, cadence=cadence, meter=meter, start_step=start_step),
                    step)
                meter.check_divergence(report, step)
                meter.restart()
            if stop and cadence.epoch_of(step) != epoch:
                break  # the epoch's last step: its evaluation and checkpoint come first (a resume skips them)
            if due.checkpoint or stop:
                checkpointer.save(step, progress=clock.state())
            if stop:
                raise preempted(meter, checkpointer, step)
        val = learner.evaluate(loaders.val)
        log(sinks, {"epoch": epoch + 1, **val, **clock.record(val["val_top1"], step=step, epoch=epoch + 1)}, step)
        checkpointer.save(step, val, progress=clock.state())
        if stop:
            raise preempted(meter, checkpointer, step)
        if cadence.reached_target(val):
            break
    return TrainResult(epochs=cadence.epochs, start_step=start_step, steps=step, train_images=meter.train_images,
                       train_time_s=meter.train_time_s, val=val,
                       stopped_at_target=cadence.reached_target(val) and step < cadence.total_steps,
                       time_to_accuracy=clock.reached)


def preempted(meter: IntervalMeter, checkpointer: Checkpointer, step: int) -> Preempted:
    """The stop on SIGTERM at `step`, whose checkpoint is committed: where to resume, and what the stop took."""
    return Preempted(f"stopped on SIGTERM at step {step}{meter.stop_vote.flag.describe_stop()}; resume from "
                     f"{checkpointer.where(step)}")


def progress(report: IntervalReport, *, step: int, lr: float, cadence: Cadence, meter: IntervalMeter,
             start_step: int) -> dict[str, float]:
    """The training metrics of a report: loss, lr, throughput, data wait, skipped steps, progress and ETA."""
    return {
        "epoch": step / cadence.steps_per_epoch,
        "loss": report.loss,
        "lr": lr,
        "images_per_s": report.images_per_s,
        "data_wait_share": report.data_wait_share,
        "nonfinite_losses": report.nonfinite_losses,
        "progress": step / cadence.total_steps,
        "eta_s": (cadence.total_steps - step) * meter.train_time_s / (step - start_step),
        **({} if report.first_step_s is None else {"first_step_s": report.first_step_s}),
    }


def log(sinks: Sequence[MetricSink], metrics: dict[str, float], step: int) -> None:
    """Give `metrics` at `step` to every sink."""
    for sink in sinks:
        sink.log(metrics, step)
