"""The training loss: softmax cross-entropy, or binary cross-entropy per class with timm's semantics.

Targets arrive as class indices, or as class probabilities after Mixup/CutMix (trainer/mix.py). Label
smoothing spreads `label_smoothing` uniformly over the classes in both losses: for bce exactly as timm's
Mixup and BinaryCrossEntropy do it (off = smoothing / classes, on = 1 - smoothing + off), so a mixed target
is lam x smoothed one-hot + (1 - lam) x the partner's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from configs.schema import OptimConfig


class BinaryCrossEntropy(nn.Module):
    """Mean over images and classes of the sigmoid cross-entropy of each logit against its target
    probability; with a threshold, targets above it become 1 and the rest 0 ("ResNet strikes back": 0.2, so
    both classes of a mixed pair count as present unless one has less than a fifth of the image)."""

    def __init__(self, *, num_classes: int, smoothing: float, target_threshold: float | None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.target_threshold = target_threshold

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 1:
            target = F.one_hot(target, self.num_classes)
        target = target.float() * (1 - self.smoothing) + self.smoothing / self.num_classes
        if self.target_threshold is not None:
            target = (target > self.target_threshold).float()
        return F.binary_cross_entropy_with_logits(logits.float(), target)


def build_criterion(cfg: OptimConfig, *, num_classes: int) -> nn.Module:
    """The loss optim.loss names, with optim.label_smoothing (and bce_target_threshold)."""
    if cfg.loss == "bce":
        return BinaryCrossEntropy(num_classes=num_classes, smoothing=cfg.label_smoothing,
                                  target_threshold=cfg.bce_target_threshold)
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


__all__ = ["BinaryCrossEntropy", "build_criterion"]
