"""The training loop: one step, read top to bottom, and the epochs around it."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from configs.schema import RunConfig
from data_pipeline import Loaders
from trainer.checkpoint import CheckpointManager
from trainer.dist import DistContext, all_reduce_max, all_reduce_sum
from trainer.ema import Ema
from trainer.evaluate import evaluate
from trainer.metrics import MetricSink
from trainer.precision import Precision
from trainer.preempt import Preempted, PreemptionFlag
from trainer.schedule import learning_rate
from trainer.state import check_compatible, checkpoint_meta, load_state, save_state
from trainer.strategy import Strategy

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainingDiverged(RuntimeError):
    """Training produced only non-finite losses for too long; it stopped rather than save NaN weights."""


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

    @property
    def images_per_s(self) -> float:
        """Measured training throughput of the whole job (0 when it resumed an already finished run)."""
        return self.train_images / self.train_time_s if self.train_time_s else 0.0


def train_step(strategy: Strategy, precision: Precision, criterion: nn.Module,
               micro_batches: list[Batch]) -> torch.Tensor:
    """Forward and backward over each micro-batch, then one update; returns the mean loss, on the device."""
    total_loss = torch.zeros((), device=precision.device)
    for i, (images, labels) in enumerate(micro_batches):
        # Gradients are reduced across ranks only on the last micro-batch's backward.
        sync = i == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else strategy.no_sync():
            with precision.autocast():
                loss = criterion(strategy.model(images), labels) / len(micro_batches)
            strategy.backward(loss)
        total_loss += loss.detach()
    strategy.step()
    return total_loss


def train(strategy: Strategy, ema: Ema | None, precision: Precision, criterion: nn.Module, loaders: Loaders,
          cfg: RunConfig, *, ctx: DistContext, peak_lr: float, global_batch_size: int, sinks: Sequence[MetricSink],
          checkpoints: CheckpointManager | None, preemption: PreemptionFlag,
          extra_meta: Callable[[], dict[str, Any]] | None = None) -> TrainResult:
    """Resume from the latest checkpoint if there is one, then per step: set the lr, step, maybe report,
    maybe checkpoint; per epoch: evaluate, report, checkpoint (with the facts `extra_meta` returns at that
    moment in its manifest). Stops with `Preempted` after a checkpoint
    at the first report after SIGTERM."""
    device = precision.device
    memory_format = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
    accumulation = cfg.optim.accumulation_steps
    steps_per_epoch = len(loaders.train) // accumulation
    total_steps = cfg.schedule.epochs * steps_per_epoch
    val: dict[str, float] = {}
    start_step = 0
    if checkpoints is not None and (manifest := checkpoints.latest()) is not None:
        check_compatible(manifest, checkpoints.url(manifest.step), cfg, global_batch_size=global_batch_size)
        load_state(checkpoints, manifest, strategy, ema, ctx)
        start_step = manifest.step
        val = {k: v for k, v in manifest.meta.items() if k.startswith(("val_", "ema_val_"))}

    def save(step: int, val: dict[str, float] | None) -> None:
        if checkpoints is None:
            return
        meta = checkpoint_meta(cfg, step=step, steps_per_epoch=steps_per_epoch,
                               global_batch_size=global_batch_size, world_size=ctx.world_size, val=val)
        if extra_meta is not None:
            meta.update(extra_meta())
        save_state(checkpoints, step, strategy, ema, ctx, meta=meta)
        for sink in sinks:
            sink.on_checkpoint(step, checkpoints.url(step))

    def to_device(batch: Batch) -> Batch:
        images, labels = batch
        return (images.to(device, non_blocking=True, memory_format=memory_format),
                labels.to(device, non_blocking=True))

    step, train_time_s, train_images = start_step, 0.0, 0
    # Consecutive steps with a non-finite loss on this rank, kept on the device (no per-step host sync).
    nonfinite_streak = torch.zeros((), dtype=torch.float64, device=device)
    for epoch in range(start_step // steps_per_epoch, cfg.schedule.epochs):
        strategy.model.train()
        # Per-interval sums, reduced over ranks only when reported: finite loss sum, finite losses, images,
        # non-finite losses, seconds waiting for data; and the longest non-finite streak, reduced with max.
        interval = torch.zeros(5, dtype=torch.float64, device=device)
        data_wait_s = 0.0
        longest_streak = torch.zeros((), dtype=torch.float64, device=device)
        running_stats = [b for b in strategy.unwrapped().buffers() if b.is_floating_point()]
        running_stats_at_start = [b.clone() for b in running_stats]
        interval_start = time.perf_counter()
        start_batch = (step - epoch * steps_per_epoch) * accumulation
        batches = loaders.train.iter_epoch(epoch, start_batch=start_batch)
        while step < (epoch + 1) * steps_per_epoch:
            lr = learning_rate(step, peak_lr=peak_lr, steps_per_epoch=steps_per_epoch, cfg=cfg.schedule)
            for group in strategy.optimizer.param_groups:
                group["lr"] = lr
            # Data wait: host time blocked on the loader (and the copy's launch), while the device may idle.
            wait_start = time.perf_counter()
            micro_batches = [to_device(batch) for batch in itertools.islice(batches, accumulation)]
            data_wait_s += time.perf_counter() - wait_start
            # A non-finite loss gives non-finite gradients (on every rank, once reduced), and the optimizer
            # skips that step on the device; here it is only counted.
            loss = train_step(strategy, precision, criterion, micro_batches).double()
            if ema is not None:
                ema.update(strategy.unwrapped())
            finite = torch.isfinite(loss)
            nonfinite_streak = (nonfinite_streak + 1) * ~finite
            longest_streak = torch.maximum(longest_streak, nonfinite_streak)
            images = sum(b[1].shape[0] for b in micro_batches)
            interval[:4] += torch.stack([torch.where(finite, loss, 0.0), finite.double(),
                                         torch.full_like(loss, images), (~finite).double()])
            step += 1
            end_of_epoch = step % steps_per_epoch == 0
            checkpoint_due = bool(cfg.checkpoint.interval_steps) and step % cfg.checkpoint.interval_steps == 0
            stop = False
            # Reports also come before every checkpoint: they are where skipped steps are cleaned up after.
            # They hold collectives, so every rank must reach the same ones: a SIGTERM is acted on at the
            # next report (at most tracking.log_interval_steps later), where all ranks agree to stop.
            if step % cfg.tracking.log_interval_steps == 0 or end_of_epoch or checkpoint_due:
                # The host syncs of the interval, which also make the timing honest.
                interval[4] = data_wait_s
                loss_sum, finite_losses, images, nonfinite, data_wait_sum_s = all_reduce_sum(interval).tolist()
                # One max-reduction for two facts: the longest non-finite streak and whether any rank got SIGTERM.
                flags = torch.stack([longest_streak, torch.tensor(float(preemption.requested), device=device,
                                                                  dtype=torch.float64)])
                streak, stop = all_reduce_max(flags).tolist()
                elapsed_s = time.perf_counter() - interval_start
                train_time_s += elapsed_s
                train_images += int(images)
                for sink in sinks:
                    sink.log({
                        "epoch": step / steps_per_epoch,
                        "loss": loss_sum / finite_losses if finite_losses else float("nan"),
                        "lr": lr,
                        "images_per_s": images / elapsed_s,
                        "data_wait_share": data_wait_sum_s / ctx.world_size / elapsed_s,
                        "nonfinite_losses": nonfinite,
                        "progress": step / total_steps,
                        "eta_s": (total_steps - step) * train_time_s / (step - start_step),
                    }, step)
                if streak >= cfg.optim.max_nonfinite_steps:
                    raise TrainingDiverged(
                        f"{int(streak)} consecutive steps before step {step} had a non-finite loss and were skipped "
                        f"(optim.max_nonfinite_steps={cfg.optim.max_nonfinite_steps}); the weights of the last "
                        "checkpoint are intact. Lower optim.lr or use a longer warm-up.")
                if nonfinite:
                    # A skipped step still ran its forward pass, which folded NaN batch statistics into the
                    # BatchNorm running averages; go back to the interval's start (they re-converge quickly).
                    torch._foreach_copy_(running_stats, running_stats_at_start)
                interval.zero_()
                data_wait_s = 0.0
                longest_streak.zero_()
                running_stats_at_start = [b.clone() for b in running_stats]
                interval_start = time.perf_counter()
            if checkpoint_due and not end_of_epoch:
                save(step, None)  # epoch ends save after evaluation, below
            if stop:
                if not (checkpoint_due and not end_of_epoch):
                    save(step, None)
                where = checkpoints.url(step) if checkpoints is not None else "nowhere (checkpoint.url is not set)"
                raise Preempted(f"stopped on SIGTERM at step {step}; resume from {where}")
        strategy.sync_buffers()
        val = evaluate(strategy.unwrapped(), loaders.val, precision, channels_last=cfg.precision.channels_last)
        if ema is not None:
            ema.sync_buffers()
            ema_val = evaluate(ema.module, loaders.val, precision, channels_last=cfg.precision.channels_last)
            val.update({f"ema_{name}": value for name, value in ema_val.items() if name != "val_images"})
        for sink in sinks:
            sink.log({"epoch": epoch + 1, **val}, step)
        save(step, val)
    return TrainResult(epochs=cfg.schedule.epochs, start_step=start_step, steps=step, train_images=train_images,
                       train_time_s=train_time_s, val=val)
