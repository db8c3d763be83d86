"""What every loader does to an image: where it is cropped, whether it is flipped, which automatic
augmentation and erasing it gets, how it is normalised.

A crop is a pixel window of the stored image plus a flip bit, drawn from the sample's own seed (see
`sharding.sample_seed`), so it depends only on (run seed, epoch, sample): not on the loader, the worker
that decodes it, or what ran before. That is what makes the DALI and the baseline loader agree and
mid-epoch resume exact. Both loaders then resize the window to the model's square input. The automatic
augmentation operations and the random-erasing box are drawn the same way, from streams of their own.
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


AUTO_AUGMENT_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
                    "contrast", "sharpness", "posterize", "solarize", "auto_contrast", "equalize")
"""The operations TrivialAugmentWide and RandAugment choose from (the same 14 in both); an `AugmentOp` names one
by its index here."""
NUM_MAGNITUDE_BINS = 31
"""Strengths are bins 0..30 of each operation's magnitude range (torchvision's and DALI's default)."""


class MagnitudeRange(NamedTuple):
    """The magnitudes of bins 0..30 of one operation: evenly spaced from `low` to `high`; `signed`: negated
    for half the draws."""

    low: float
    high: float
    signed: bool


_ENHANCE = ("brightness", "color", "contrast", "sharpness")  # parameter: factor 1 + magnitude
_NO_MAGNITUDE = MagnitudeRange(0.0, 0.0, False)


def _ranges(*, shear: float, translate: float, rotate: float, enhance: float,
            posterize_bits: int) -> dict[str, MagnitudeRange]:
    ranges = {"identity": _NO_MAGNITUDE, "shear_x": MagnitudeRange(0, shear, True),
              "shear_y": MagnitudeRange(0, shear, True), "translate_x": MagnitudeRange(0, translate, True),
              "translate_y": MagnitudeRange(0, translate, True), "rotate": MagnitudeRange(0, rotate, True),
              "posterize": MagnitudeRange(8, posterize_bits, False), "solarize": MagnitudeRange(255, 0, False),
              "auto_contrast": _NO_MAGNITUDE, "equalize": _NO_MAGNITUDE}
    ranges.update({name: MagnitudeRange(0, enhance, True) for name in _ENHANCE})
    assert tuple(sorted(ranges)) == tuple(sorted(AUTO_AUGMENT_OPS))
    return ranges


MAGNITUDE_RANGES = {
    # torchvision's augmentation spaces (transforms.v2.TrivialAugmentWide, RandAugment). Units: shear factor
    # (x += factor * y), translation as a fraction of the image side (TrivialAugmentWide's 32 px of 224),
    # degrees, enhancement factor 1 + magnitude, bits kept, solarize threshold.
    "trivial": _ranges(shear=0.99, translate=32 / 224, rotate=135, enhance=0.99, posterize_bits=2),
    "rand": _ranges(shear=0.3, translate=150 / 331, rotate=30, enhance=0.9, posterize_bits=4),
}
"""Magnitude range of each operation, per policy: the one definition both loaders apply."""
AUTO_AUGMENT_FILL = 128
"""Grey value of the pixels that shears, translations and rotations move in (DALI's default)."""


class AugmentOp(NamedTuple):
    """One automatic-augmentation operation for one image."""

    op: int
    """Index into AUTO_AUGMENT_OPS."""
    magnitude_bin: int
    """Strength, 0..NUM_MAGNITUDE_BINS - 1."""
    negate: bool
    """Negate the magnitude (only for operations with a signed range)."""

    @property
    def name(self) -> str:
        return AUTO_AUGMENT_OPS[self.op]

    def magnitude(self, policy: str) -> float:
        """The operation's signed magnitude under `policy` ("trivial" or "rand")."""
        low, high, signed = MAGNITUDE_RANGES[policy][self.name]
        value = low + (high - low) * self.magnitude_bin / (NUM_MAGNITUDE_BINS - 1)
        return -value if signed and self.negate else value


def num_auto_augment_ops(cfg: DataConfig) -> int:
    """Operations applied to each training image, one after the other: 0 (off), 1 (TrivialAugmentWide) or
    rand_augment_ops (RandAugment)."""
    return {"none": 0, "trivial": 1, "rand": cfg.rand_augment_ops}[cfg.auto_augment]


def auto_augment_for(cfg: DataConfig, *, seed: int) -> tuple[AugmentOp, ...]:
    """The `num_auto_augment_ops` automatic-augmentation operations of one training image, in order, from the
    sample's seed (a stream of its own: the crop's draws are unchanged by turning this on)."""
    if cfg.auto_augment == "none":
        return ()
    rng = random.Random(f"auto_augment/{seed}")
    if cfg.auto_augment == "trivial":
        return (AugmentOp(rng.randrange(len(AUTO_AUGMENT_OPS)), rng.randrange(NUM_MAGNITUDE_BINS),
                          rng.random() < 0.5),)
    return tuple(AugmentOp(rng.randrange(len(AUTO_AUGMENT_OPS)), cfg.rand_augment_magnitude, rng.random() < 0.5)
                 for _ in range(num_auto_augment_ops(cfg)))


class Box(NamedTuple):
    """A rectangle of an output image, in pixels."""

    top: int
    left: int
    height: int
    width: int


ERASE_AREAS = (0.02, 1 / 3)
"""Range of the fraction of the image a random-erasing box covers (torchvision's and timm's)."""
ERASE_ASPECT_RATIOS = (0.3, 1 / 0.3)
"""Range of a random-erasing box's height/width ratio, drawn log-uniformly."""


def erase_box_for(size: int, cfg: DataConfig, *, seed: int) -> Box | None:
    """The box random erasing blanks in a `size` x `size` training image, from the sample's seed (torchvision's
    RandomErasing rule: 10 tries at a box that fits); None: this image is not erased."""
    if cfg.random_erasing_prob == 0:
        return None
    rng = random.Random(f"random_erasing/{seed}")
    if rng.random() >= cfg.random_erasing_prob:
        return None
    log_low, log_high = math.log(ERASE_ASPECT_RATIOS[0]), math.log(ERASE_ASPECT_RATIOS[1])
    for _ in range(10):
        area = size * size * rng.uniform(*ERASE_AREAS)
        aspect = math.exp(rng.uniform(log_low, log_high))
        height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < height < size and 0 < width < size:
            return Box(rng.randint(0, size - height), rng.randint(0, size - width), height, width)
    return None
