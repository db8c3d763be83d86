"""An exponential moving average of the weights, evaluated beside the model (as in timm's ModelEmaV2)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from trainer.dist import broadcast_buffers


class Ema:
    """ema = decay * ema + (1 - decay) * weights after every optimiser step, for parameters and floating
    buffers (BatchNorm running statistics); integer buffers are copied. Kept on every rank, on the device,
    so an update costs two fused kernels and no host sync."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor],
                                                 list[torch.Tensor]]:
        mine, theirs = self.module.state_dict(), model.state_dict()
        floating = [k for k, v in mine.items() if v.is_floating_point()]
        integer = [k for k, v in mine.items() if not v.is_floating_point()]
        return ([mine[k] for k in floating], [theirs[k] for k in floating],
                [mine[k] for k in integer], [theirs[k] for k in integer])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards `model`'s current weights."""
        averaged, current, counters, current_counters = self._pairs(model)
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay)
        torch._foreach_copy_(counters, current_counters)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start the average afresh from `model`'s weights."""
        averaged, current, counters, current_counters = self._pairs(model)
        torch._foreach_copy_(averaged + counters, current + current_counters)

    def sync_buffers(self) -> None:
        """Take rank 0's averaged BatchNorm statistics (ranks differ when the strategy does not sync them)."""
        broadcast_buffers(self.module)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights, with the model's (torchvision-compatible) names."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.module.load_state_dict(state)
