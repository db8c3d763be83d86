"""The optimiser: SGD with momentum, weight decay only where it regularises."""

from __future__ import annotations

import torch
from torch import nn

from configs.schema import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Conv and linear weights decay; BatchNorm weights/biases and all biases (every 1-D tensor) do not.

    Decaying BN scales and biases hurts accuracy at large batch (Goyal et al. 2017 keep it, later
    recipes such as https://arxiv.org/abs/1807.11205 and NVIDIA's drop it).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, peak_lr: float) -> torch.optim.Optimizer:
    """SGD over `model`'s parameters; the schedule sets the lr of every group each step, starting from `peak_lr`."""
    return torch.optim.SGD(
        parameter_groups(model, cfg.weight_decay), lr=peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov
    )


def peak_learning_rate(cfg: OptimConfig, global_batch_size: int) -> float:
    """The configured lr, scaled by global_batch_size / 256 when the linear scaling rule is on."""
    return cfg.lr * global_batch_size / 256 if cfg.scale_lr else cfg.lr
