"""Stochastic depth (Huang et al. 2016, https://arxiv.org/abs/1603.09382) in timm's "drop path" form: in
training, each image skips a residual block's branch with the block's rate (its shortcut carries it on alone),
and kept branches are scaled by 1 / (1 - rate) so that evaluation, which keeps every branch, sees the same
expectation. Rates grow linearly over the blocks, from 0 at the first to model.drop_path_rate at the last
(timm's rule). The modules hold no parameters or buffers: the state dict stays torchvision's.

The draws come from torch's global generator, seeded again before every micro-batch's forward pass from
(run seed, step, micro-batch, rank): a resumed run drops exactly the branches the uninterrupted one dropped,
ranks draw independently, and a compiled model draws in its graph without a host-side generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

DROP_PATH_STREAM = 0xD20
"""Tells the seeds of drop-path draws apart from every other per-step seed derived from the run's seed."""


class DropPath(nn.Module):
    """Zero the residual branch of each image with probability `rate` in training; identity in evaluation."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        keep = 1 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4f}"


def block_rates(rate: float, blocks: int) -> list[float]:
    """The drop rate of each of `blocks` residual blocks in order: linear from 0 to `rate`."""
    return [rate * index / max(blocks - 1, 1) for index in range(blocks)]


def apply_drop_path(network: nn.Module, rate: float) -> None:
    """Give each residual block of `network` (those with a `drop_path` slot) its rate, in network order."""
    blocks = [module for module in network.modules() if hasattr(module, "drop_path") and hasattr(module, "last_bn")]
    for block, block_rate in zip(blocks, block_rates(rate, len(blocks)), strict=True):
        block.drop_path = DropPath(block_rate) if block_rate > 0 else nn.Identity()


@dataclass(frozen=True, slots=True)
class DropPathSeeds:
    """Seeds torch's generators before each micro-batch's forward pass (see the module docstring)."""

    seed: int
    """The run's seed."""
    rank: int
    """This process's rank."""

    def seed_micro_batch(self, *, step: int, micro_batch: int) -> None:
        """Seed torch's CPU and GPU generators for micro-batch `micro_batch` of optimiser step `step`."""
        entropy = [self.seed, step, micro_batch, self.rank, DROP_PATH_STREAM]
        torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1))


__all__ = ["DropPath", "DropPathSeeds", "apply_drop_path", "block_rates"]
