"""Mixup and CutMix on the device, per micro-batch, with timm's semantics.

Each micro-batch is mixed with itself reversed (image i with image N-1-i), with probability
`data.mix_prob`; CutMix is chosen over mixup with probability `data.mix_switch_prob` when both are on.
Mixup blends whole images with weight lam ~ Beta(mixup_alpha, mixup_alpha); CutMix pastes a box of the
partner image whose area is 1 - lam, lam ~ Beta(cutmix_alpha, cutmix_alpha), and then takes lam as the
area actually kept after clipping the box to the image. The targets become class probabilities
(lam x one-hot(label) + (1 - lam) x one-hot(partner's label)); the loss folds label smoothing into them.

Every draw comes from a generator seeded by (run seed, step, micro-batch), never from a global one, so a
resumed run mixes exactly as the uninterrupted one did.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from configs.schema import DataConfig

Batch = tuple[torch.Tensor, torch.Tensor]


def mix_seed(seed: int, step: int, micro_batch: int) -> int:
    """The seed of the mix of micro-batch `micro_batch` of step `step`."""
    return ((seed * 1_000_003 + step) * 1_009 + micro_batch) % 2**63


class BatchMixer:
    """Mixes micro-batches as `data.mixup_alpha`, `cutmix_alpha`, `mix_prob` and `mix_switch_prob` say."""

    def __init__(self, cfg: DataConfig, *, num_classes: int, seed: int) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.seed = seed

    @property
    def enabled(self) -> bool:
        """Whether any mixing is configured."""
        return self.cfg.mixup_alpha > 0 or self.cfg.cutmix_alpha > 0

    def mix(self, micro_batches: list[Batch], *, step: int) -> list[Batch]:
        """The micro-batches of step `step` mixed, with probability targets [N, classes] (float32)."""
        if not self.enabled:
            return micro_batches
        return [self.mix_one(images, labels, seed=mix_seed(self.seed, step, i))
                for i, (images, labels) in enumerate(micro_batches)]

    def mix_one(self, images: torch.Tensor, labels: torch.Tensor, *, seed: int) -> Batch:
        """One micro-batch mixed with its reverse, by the draws of `seed`."""
        rng = np.random.default_rng(seed)
        targets = F.one_hot(labels, self.num_classes).float()
        if rng.random() >= self.cfg.mix_prob:
            return images, targets
        use_cutmix = self.cfg.cutmix_alpha > 0 and (self.cfg.mixup_alpha <= 0
                                                    or rng.random() < self.cfg.mix_switch_prob)
        partner = images.flip(0)
        if use_cutmix:
            lam = float(rng.beta(self.cfg.cutmix_alpha, self.cfg.cutmix_alpha))
            height, width = images.shape[-2:]
            top, bottom, left, right = cutmix_box(height, width, lam=lam, rng=rng)
            images = images.clone()
            images[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (height * width)  # the area actually kept
        else:
            lam = float(rng.beta(self.cfg.mixup_alpha, self.cfg.mixup_alpha))
            images = images * lam + partner * (1 - lam)
        return images, targets * lam + targets.flip(0) * (1 - lam)


def cutmix_box(height: int, width: int, *, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box of area (1 - lam) of the image, centred uniformly at random and clipped to the image: (top,
    bottom, left, right)."""
    ratio = math.sqrt(1 - lam)
    box_height, box_width = int(height * ratio), int(width * ratio)
    centre_y, centre_x = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = max(centre_y - box_height // 2, 0), min(centre_y + box_height // 2, height)
    left, right = max(centre_x - box_width // 2, 0), min(centre_x + box_width // 2, width)
    return top, bottom, left, right


__all__ = ["BatchMixer", "cutmix_box", "mix_seed"]
