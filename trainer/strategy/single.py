"""One process, no wrapper: the reference every other strategy must agree with."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from trainer.serialize import from_bytes, to_bytes

TRAIN_STATE = "train_state.pt"


def bare_module(model: nn.Module) -> nn.Module:
    """`model` without a torch.compile wrapper (whose state dict names carry an `_orig_mod.` prefix)."""
    original = getattr(model, "_orig_mod", model)
    assert isinstance(original, nn.Module)
    return original


class SingleStrategy:
    """The model as it is; the optimizer stepped through the gradient scaler (a pass-through unless fp16)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                 is_primary: bool = True, clip_grad_norm: float | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.is_primary = is_primary
        self.clip_grad_norm = clip_grad_norm

    def no_sync(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        if self.clip_grad_norm is not None:
            # On the true gradients (fp16: unscaled first; the scaler then steps without unscaling again), which
            # DDP has already averaged over ranks: every rank clips by the same global norm. Non-finite
            # gradients stay non-finite, and the step is skipped as without clipping.
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.unwrapped().parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def unwrapped(self) -> nn.Module:
        return bare_module(self.model)

    def sync_buffers(self) -> None:
        pass

    def save_files(self) -> dict[str, bytes]:
        # Optimizer and scaler state are identical on every rank: rank 0 writes them.
        if not self.is_primary:
            return {}
        return {TRAIN_STATE: to_bytes({"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()})}

    def check_file(self, name: str, data: bytes) -> None:
        from_bytes(data)

    def load_files(self, names: list[str], read: Callable[[str], bytes]) -> None:
        if TRAIN_STATE not in names:
            raise ValueError(f"the checkpoint has no {TRAIN_STATE} (its files: {', '.join(names)}): it was written "
                             "by another distributed.strategy; resume it with that strategy")
        state = from_bytes(read(TRAIN_STATE))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
