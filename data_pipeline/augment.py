"""What every loader does to an image: where it is cropped, whether it is flipped, how it is normalised.

A crop is a pixel window of the stored image plus a flip bit, drawn from the sample's own seed (see
`sharding.sample_seed`), so it depends only on (run seed, epoch, sample): not on the loader, the worker
that decodes it, or what ran before. That is what makes the DALI and the baseline loader agree and
mid-epoch resume exact. Both loaders then resize the window to the model's square input.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

from configs.schema import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of RGB values in [0, 1], subtracted before the model sees an image."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation the centred values are divided by."""
ASPECT_RATIOS = (3 / 4, 4 / 3)
"""Range of width/height ratios of a training crop (Inception's, as in torchvision)."""


class Crop(NamedTuple):
    """A window of the stored image, then maybe a horizontal flip."""

    left: int
    top: int
    width: int
    height: int
    flip: bool


def train_crop(width: int, height: int, *, seed: int, min_area: float, flip: bool) -> Crop:
    """Inception-style random-resized crop: an area fraction in [min_area, 1] and a log-uniform aspect ratio,
    10 tries, else the largest centred window within the ratio range (torchvision's RandomResizedCrop rule)."""
    rng = random.Random(seed)
    area = width * height
    log_low, log_high = math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1])
    for _ in range(10):
        target_area = area * rng.uniform(min_area, 1.0)
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = rng.randint(0, height - crop_height)
            left = rng.randint(0, width - crop_width)
            return Crop(left, top, crop_width, crop_height, flip and rng.random() < 0.5)
    crop_width, crop_height = width, height
    if width / height < ASPECT_RATIOS[0]:
        crop_height = min(height, round(width / ASPECT_RATIOS[0]))
    elif width / height > ASPECT_RATIOS[1]:
        crop_width = min(width, round(height * ASPECT_RATIOS[1]))
    return Crop((width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height,
                flip and rng.random() < 0.5)


def crop_for(width: int, height: int, cfg: DataConfig, *, train: bool, seed: int) -> Crop:
    """The crop of one image of `width` x `height` pixels: `train_crop` from the sample's seed when training,
    else `val_crop` (which ignores the seed)."""
    if train:
        return train_crop(width, height, seed=seed, min_area=cfg.min_crop_area, flip=cfg.random_flip)
    return val_crop(width, height, crop_ratio=cfg.val_crop_ratio)


def val_crop(width: int, height: int, *, crop_ratio: float) -> Crop:
    """The centred square of side crop_ratio x the shorter side: the region that "resize the shorter side to
    size / crop_ratio, then centre-crop size" keeps, taken before resizing (so it can be decoded alone)."""
    side = max(1, round(min(width, height) * crop_ratio))
    return Crop((width - side) // 2, (height - side) // 2, side, side, False)
