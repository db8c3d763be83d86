"""BlurPool: anti-aliased downsampling (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again",
https://arxiv.org/abs/1904.11486), applied to a ResNet as FFCV's and Composer's fast ImageNet recipes do:
every strided convolution with at least 16 input channels first low-pass filters its input (a 3x3 binomial
blur, stride 1), and the stem's max-pool takes its maximum at stride 1, then blurs with stride 2.

The replacements keep the parameters (and names) of what they replace, and their filter is not saved, so
the state dict is torchvision's; but the function differs, so a checkpoint records `blurpool` in its
architecture and only loads into a network built the same way.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

MIN_CHANNELS = 16
"""Strided convolutions with fewer input channels (the RGB stem) are left as they are."""


def _binomial_filter() -> torch.Tensor:
    """The 3x3 binomial low-pass filter [1, 2, 1] x [1, 2, 1] / 16, shaped [1, 1, 3, 3]."""
    row = torch.tensor([1.0, 2.0, 1.0])
    return (row[:, None] * row[None, :] / 16).reshape(1, 1, 3, 3)


def blur(x: torch.Tensor, kernel: torch.Tensor, *, stride: int) -> torch.Tensor:
    """Each channel of `x` filtered by `kernel` ([1, 1, 3, 3]) with zero padding of 1."""
    channels = x.shape[1]
    return F.conv2d(x, kernel.to(x.dtype).expand(channels, 1, 3, 3), stride=stride, padding=1, groups=channels)


class BlurConv2d(nn.Conv2d):
    """A strided convolution that blurs its input first; the same weights as the convolution it replaces."""

    blur_kernel: torch.Tensor

    def __init__(self, conv: nn.Conv2d) -> None:
        pair = tuple[int, int]
        super().__init__(conv.in_channels, conv.out_channels, cast(pair, conv.kernel_size),
                         stride=cast(pair, conv.stride), padding=cast(pair, conv.padding),
                         dilation=cast(pair, conv.dilation), groups=conv.groups, bias=conv.bias is not None,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.weight = conv.weight
        self.bias = conv.bias
        self.register_buffer("blur_kernel", _binomial_filter(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(blur(x, self.blur_kernel, stride=1))


class MaxBlurPool2d(nn.Module):
    """Max-pooling at stride 1, then a blur that downsamples by 2 (replaces a 3x3/2 max-pool)."""

    blur_kernel: torch.Tensor

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.kernel_size, self.padding = pool.kernel_size, pool.padding
        self.register_buffer("blur_kernel", _binomial_filter(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(x, self.kernel_size, stride=1, padding=self.padding)
        return blur(x, self.blur_kernel, stride=2)


def apply_blurpool(module: nn.Module) -> nn.Module:
    """Replace, in place, every strided convolution with at least MIN_CHANNELS inputs by a `BlurConv2d` and
    every strided max-pool by a `MaxBlurPool2d`; returns `module`."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= MIN_CHANNELS:
            setattr(module, name, BlurConv2d(child))
        elif isinstance(child, nn.MaxPool2d) and child.stride not in (1, (1, 1)):
            setattr(module, name, MaxBlurPool2d(child))
        else:
            apply_blurpool(child)
    return module


__all__ = ["BlurConv2d", "MaxBlurPool2d", "apply_blurpool"]
