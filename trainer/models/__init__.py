"""The ResNet family and `build_model`, which turns a `ModelConfig` into a module."""

from __future__ import annotations

from configs.schema import ModelConfig
from trainer.models.blurpool import apply_blurpool
from trainer.models.drop_path import DropPathSeeds, apply_drop_path
from trainer.models.flops import macs_per_image, training_flops_per_image
from trainer.models.resnet import (
    MODELS, BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101, resnet152,
)

__all__ = [
    "MODELS", "BasicBlock", "Bottleneck", "DropPathSeeds", "ResNet", "apply_blurpool", "apply_drop_path",
    "build_model", "macs_per_image",
    "training_flops_per_image", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
]


def build_model(cfg: ModelConfig) -> ResNet:
    """Build the configured ResNet on the CPU with its initial weights (with BlurPool and stochastic depth if
    configured)."""
    network = MODELS[cfg.name](
        num_classes=cfg.num_classes, zero_init_residual=cfg.zero_init_residual, small_input=cfg.small_input
    )
    if cfg.blurpool:
        apply_blurpool(network)
    if cfg.drop_path_rate:
        apply_drop_path(network, cfg.drop_path_rate)
    return network
