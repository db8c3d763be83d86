"""Multiply-accumulate counts of a model, for throughput-to-MFU conversions."""

from __future__ import annotations

import torch
from torch import nn


def macs_per_image(model: nn.Module, image_size: int) -> int:
    """Multiply-adds of the conv and linear layers for one `image_size` x `image_size` RGB image.

    Counts what dominates ResNet compute (BatchNorm, ReLU, pooling and the residual adds are a
    fraction of a percent, and are left out, as in the paper's FLOPs figures). Runs one forward pass
    on the model's device; build the model on the `meta` device to count without computing.
    """
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kernel_h, kernel_w = module.kernel_size
            macs += output.numel() * (module.in_channels // module.groups) * kernel_h * kernel_w
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return macs


def training_flops_per_image(model: nn.Module, image_size: int) -> int:
    """Floating-point operations of one training step per image: forward plus a backward of twice its cost.

    2 FLOPs per multiply-add, and the usual 3x forward for forward + backward
    (https://arxiv.org/abs/2204.02311, appendix B, uses the same convention for MFU).
    """
    return 3 * 2 * macs_per_image(model, image_size)
