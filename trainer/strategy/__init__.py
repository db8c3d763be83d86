"""How the model, its gradients and its optimizer are shared between workers.

The loop talks to a `Strategy` only: it calls `model` forward, `backward`, `step`, and asks for
`unwrapped()` and the optimizer state for checkpoints. It never asks which strategy it has.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from torch import nn

from configs.schema import DistributedConfig
from trainer.dist import DistContext


class Strategy(Protocol):
    """One worker's view of the wrapped model and its update rule."""

    model: nn.Module
    """What the forward pass calls (possibly a DDP or DeepSpeed wrapper)."""
    optimizer: torch.optim.Optimizer
    """The optimizer whose param groups the schedule sets."""

    def no_sync(self) -> contextlib.AbstractContextManager[object]:
        """Context for backward passes of micro-batches that precede the last one of a step."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss` (scaled for fp16)."""
        ...

    def step(self) -> None:
        """Apply the accumulated gradients (fp16: unless they overflowed) and clear them."""
        ...

    def unwrapped(self) -> nn.Module:
        """The bare model, with torchvision-compatible parameter names."""
        ...

    def sync_buffers(self) -> None:
        """Make BatchNorm running statistics equal on every rank (rank 0's), before evaluating or saving."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and scaler state, for checkpoints."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        ...


def build_strategy(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   cfg: DistributedConfig, ctx: DistContext) -> Strategy:
    """Wrap `model` (already on its device and in its memory format) for `cfg.strategy`."""
    if cfg.strategy == "ddp":
        from trainer.strategy.ddp import DDPStrategy

        return DDPStrategy(model, optimizer, scaler, cfg, ctx)
    from trainer.strategy.single import SingleStrategy

    return SingleStrategy(model, optimizer, scaler)
