"""How the model, its gradients and its optimizer are shared between workers.

The loop talks to a `Strategy` only: it calls `model` forward, `backward`, `step`, and asks for
`unwrapped()` and the strategy's checkpoint files. It never asks which strategy it has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from configs.schema import DistributedConfig
from trainer.dist import DistContext


class Strategy(Protocol):
    """One worker's view of the wrapped model and its update rule."""

    model: nn.Module
    """What the forward pass calls (possibly a DDP wrapper or a DeepSpeed engine)."""
    optimizer: torch.optim.Optimizer
    """The torch optimizer that applies the update; the schedule sets the lr of its param groups."""

    def no_sync(self) -> contextlib.AbstractContextManager[object]:
        """Context for backward passes of micro-batches that precede the last one of a step."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss` (scaled for fp16)."""
        ...

    def step(self) -> None:
        """Apply the accumulated gradients (unless they are non-finite: then skip) and clear them."""
        ...

    def unwrapped(self) -> nn.Module:
        """The bare model, with torchvision-compatible parameter names."""
        ...

    def sync_buffers(self) -> None:
        """Make BatchNorm running statistics equal on every rank (rank 0's), before evaluating or saving."""
        ...

    def save_files(self) -> dict[str, bytes]:
        """This rank's share of the optimizer (and scaler, engine) state, as named checkpoint files.
        Called on every rank."""
        ...

    def check_file(self, name: str, data: bytes) -> None:
        """Raise if the checkpoint file `name` holds anything but weights and plain data (before any loading)."""
        ...

    def load_files(self, names: list[str], read: Callable[[str], bytes]) -> None:
        """Restore from a committed checkpoint: `names` lists all its files, `read(name)` returns one."""
        ...


def build_strategy(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   cfg: DistributedConfig, ctx: DistContext, *, micro_batch_size: int, accumulation_steps: int,
                   clip_grad_norm: float | None = None) -> Strategy:
    """Wrap `model` (already on its device, in its memory format, maybe compiled) for `cfg.strategy`. DDP of one
    process is the single-process strategy (the same arithmetic, no process group needed), so that a recipe
    for N workers also runs with one. `clip_grad_norm`: optim.clip_grad_norm, applied by each strategy to the
    averaged, unscaled gradients."""
    if cfg.strategy == "ddp" and ctx.world_size > 1:
        from trainer.strategy.ddp import DDPStrategy

        return DDPStrategy(model, optimizer, scaler, cfg, ctx, clip_grad_norm=clip_grad_norm)
    if cfg.strategy == "deepspeed":
        from trainer.strategy.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(model, optimizer, cfg, ctx, micro_batch_size=micro_batch_size,
                                 accumulation_steps=accumulation_steps, clip_grad_norm=clip_grad_norm)
    from trainer.strategy.single import SingleStrategy

    return SingleStrategy(model, optimizer, scaler, clip_grad_norm=clip_grad_norm)
