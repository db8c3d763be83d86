"""One process, no wrapper: the reference every other strategy must agree with."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


class SingleStrategy:
    """The model as it is; the optimizer stepped through the gradient scaler (a pass-through unless fp16)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler

    def no_sync(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def unwrapped(self) -> nn.Module:
        return self.model

    def sync_buffers(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
