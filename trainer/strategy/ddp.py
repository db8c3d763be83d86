"""PyTorch DistributedDataParallel: every rank holds the whole model, gradients are averaged in buckets."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from configs.schema import DistributedConfig
from trainer.dist import DistContext, broadcast_buffers
from trainer.strategy.single import SingleStrategy, bare_module


def ddp_device_ids(device: torch.device) -> list[int] | None:
    """DDP's `device_ids`: the GPU the model lives on (one per process), None on CPUs."""
    return [device.index] if device.type == "cuda" else None


class DDPStrategy(SingleStrategy):
    """`SingleStrategy` with the model wrapped in DDP (nccl on GPUs, gloo on CPUs)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 cfg: DistributedConfig, ctx: DistContext, *, clip_grad_norm: float | None = None) -> None:
        self.bare = bare_module(model)
        wrapped = DistributedDataParallel(
            model,
            device_ids=ddp_device_ids(ctx.device),
            bucket_cap_mb=cfg.bucket_cap_mb,
            # Gradients are written straight into the communication buckets: one copy less per step.
            gradient_as_bucket_view=True,
        )
        super().__init__(wrapped, optimizer, scaler, is_primary=ctx.is_primary, clip_grad_norm=clip_grad_norm)

    def no_sync(self) -> contextlib.AbstractContextManager[object]:
        assert isinstance(self.model, DistributedDataParallel)
        return self.model.no_sync()

    def unwrapped(self) -> nn.Module:
        return self.bare

    def sync_buffers(self) -> None:
        # After the last forward each rank's running statistics moved with its own batch; take rank 0's,
        # as DDP itself would before the next forward.
        broadcast_buffers(self.bare)
