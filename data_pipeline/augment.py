"""What every loader does to an image: where it is cropped, whether it is flipped, which automatic
augmentation and erasing it gets, how it is normalised.

A crop is a pixel window of the stored image plus a flip bit, drawn from the sample's own seed (see
`sharding.sample_seed`), so it depends only on (run seed, epoch, sample): not on the loader, the worker
that decodes it, or what ran before. That is what makes the DALI and the baseline loader agree and
mid-epoch resume exact. Both loaders then resize the window to the model's square input. The automatic
augmentation operations and the random-erasing box are drawn the same way, from streams of their own.

All of it is drawn for a whole batch at once (`plan_batch`): numpy over arrays of seeds with a counter-based
generator, instead of a Python generator and loop per image, so that preparing a batch of 256 costs the
reader thread well under a millisecond (bench data: reader CPU ms per batch). The generator is
`draws.py`'s; the automatic augmentation's operations and magnitudes are `auto_augment.py`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from configs.schema import DataConfig
from data_pipeline.auto_augment import AugmentDraws, auto_augments_for
from data_pipeline.draws import CROP_STREAM, ERASE_STREAM, below, uniform_draws

if TYPE_CHECKING:
    from data_pipeline.index import SplitIndex
    from data_pipeline.sharding import SampleKey

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


class Crops(NamedTuple):
    """The crops of a batch: one int64 array (bool for `flip`) of the batch's length per field of `Crop`."""

    left: np.ndarray
    top: np.ndarray
    width: np.ndarray
    height: np.ndarray
    flip: np.ndarray

    def crop(self, i: int) -> Crop:
        """Image `i`'s crop."""
        return Crop(int(self.left[i]), int(self.top[i]), int(self.width[i]), int(self.height[i]), bool(self.flip[i]))


_TRIES = 10
"""Tries at a random window (torchvision's RandomResizedCrop and RandomErasing rule)."""


def train_crops(widths: np.ndarray, heights: np.ndarray, seeds: np.ndarray, *, min_area: float,
                flip: bool) -> Crops:
    """Inception-style random-resized crops of a batch: an area fraction in [min_area, 1] and a log-uniform
    aspect ratio, 10 tries, else the largest centred window within the ratio range (torchvision's
    RandomResizedCrop rule), all tries of all images at once."""
    widths, heights = np.asarray(widths, dtype=np.int64), np.asarray(heights, dtype=np.int64)
    u = uniform_draws(seeds, stream=CROP_STREAM, count=4 * _TRIES + 1)
    area = (widths * heights)[:, None] * (min_area + (1.0 - min_area) * u[:, :_TRIES])
    log_low, log_high = math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1])
    aspect = np.exp(log_low + (log_high - log_low) * u[:, _TRIES:2 * _TRIES])
    # np.rint rounds half to even, as Python's round().
    crop_widths = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    crop_heights = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = ((crop_widths > 0) & (crop_widths <= widths[:, None])
            & (crop_heights > 0) & (crop_heights <= heights[:, None]))
    rows, first = np.arange(len(widths)), fits.argmax(axis=1)
    found = fits[rows, first]
    # No try fitted: the whole image, cut to the ratio range, centred.
    ratio = widths / np.maximum(heights, 1)
    whole_width = np.where(ratio > ASPECT_RATIOS[1], np.minimum(widths, np.rint(heights * ASPECT_RATIOS[1])), widths)
    whole_height = np.where(ratio < ASPECT_RATIOS[0], np.minimum(heights, np.rint(widths / ASPECT_RATIOS[0])),
                            heights)
    width = np.where(found, crop_widths[rows, first], whole_width).astype(np.int64)
    height = np.where(found, crop_heights[rows, first], whole_height).astype(np.int64)
    top = np.where(found, below(u[:, 2 * _TRIES:3 * _TRIES][rows, first], heights - height + 1),
                   (heights - height) // 2)
    left = np.where(found, below(u[:, 3 * _TRIES:4 * _TRIES][rows, first], widths - width + 1),
                    (widths - width) // 2)
    flips = np.full(len(widths), flip) & (u[:, -1] < 0.5)
    return Crops(left, top, width, height, flips)


def val_crops(widths: np.ndarray, heights: np.ndarray, *, crop_ratio: float) -> Crops:
    """The centred squares of side crop_ratio x the shorter side: the region that "resize the shorter side to
    size / crop_ratio, then centre-crop size" keeps, taken before resizing (so it can be decoded alone)."""
    widths, heights = np.asarray(widths, dtype=np.int64), np.asarray(heights, dtype=np.int64)
    side = np.maximum(1, np.rint(np.minimum(widths, heights) * crop_ratio)).astype(np.int64)
    return Crops((widths - side) // 2, (heights - side) // 2, side, side, np.zeros(len(widths), dtype=bool))


def crops_for(widths: np.ndarray, heights: np.ndarray, seeds: np.ndarray, cfg: DataConfig, *,
              train: bool) -> Crops:
    """The crops of a batch of images of `widths` x `heights` pixels: `train_crops` from the samples' seeds
    when training, else `val_crops` (which ignore the seeds)."""
    if train:
        return train_crops(widths, heights, seeds, min_area=cfg.min_crop_area, flip=cfg.random_flip)
    return val_crops(widths, heights, crop_ratio=cfg.val_crop_ratio)


def crop_for(width: int, height: int, cfg: DataConfig, *, train: bool, seed: int) -> Crop:
    """The crop of one image (`crops_for` of a batch of one)."""
    return crops_for(np.array([width]), np.array([height]), np.array([seed], dtype=np.uint64), cfg, train=train).crop(0)


def val_crop(width: int, height: int, *, crop_ratio: float) -> Crop:
    """The validation crop of one image (`val_crops` of a batch of one)."""
    return val_crops(np.array([width]), np.array([height]), crop_ratio=crop_ratio).crop(0)


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


def erase_boxes_for(size: int, seeds: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """The boxes random erasing blanks in a batch of `size` x `size` training images, from the samples' seeds
    (torchvision's RandomErasing rule: with probability random_erasing_prob, 10 tries at a box that fits), as
    an int64 array [batch, 4] of (top, left, height, width); an image not erased has an empty box."""
    u = uniform_draws(seeds, stream=ERASE_STREAM, count=4 * _TRIES + 1)
    area = size * size * (ERASE_AREAS[0] + (ERASE_AREAS[1] - ERASE_AREAS[0]) * u[:, 1:_TRIES + 1])
    log_low, log_high = math.log(ERASE_ASPECT_RATIOS[0]), math.log(ERASE_ASPECT_RATIOS[1])
    aspect = np.exp(log_low + (log_high - log_low) * u[:, _TRIES + 1:2 * _TRIES + 1])
    heights = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    widths = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (heights > 0) & (heights < size) & (widths > 0) & (widths < size)
    rows, first = np.arange(len(u)), fits.argmax(axis=1)
    erased = (u[:, 0] < cfg.random_erasing_prob) & fits[rows, first]
    height, width = heights[rows, first], widths[rows, first]
    top = below(u[:, 2 * _TRIES + 1:3 * _TRIES + 1][rows, first], size - height + 1)
    left = below(u[:, 3 * _TRIES + 1:][rows, first], size - width + 1)
    return np.stack([top, left, height, width], axis=1) * erased[:, None]


def erase_box_for(size: int, cfg: DataConfig, *, seed: int) -> Box | None:
    """The box random erasing blanks in one training image (`erase_boxes_for` of a batch of one); None: this
    image is not erased."""
    if cfg.random_erasing_prob == 0:
        return None
    return erase_box_of(erase_boxes_for(size, np.array([seed], dtype=np.uint64), cfg)[0])


def erase_box_of(row: np.ndarray) -> Box | None:
    """One row of `erase_boxes_for` as a `Box`; None for the empty box of an image that is not erased."""
    top, left, height, width = row.tolist()
    return Box(top, left, height, width) if height else None


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Everything random about a batch, drawn at once for all its images: what both loaders apply."""

    crops: Crops
    """Each image's window of the stored image, and its flip."""
    size: int
    """The side every image is resized to (the epoch's, with progressive resizing)."""
    auto_augment: AugmentDraws | None
    """The automatic augmentation's operations (training with data.auto_augment), else None."""
    erase_boxes: np.ndarray | None
    """Random erasing's boxes [batch, 4] (training with data.random_erasing_prob > 0), else None."""


class BatchPlanner:
    """`plan_batch` for the batches of one split, given as `SampleKey`s: the split's image sizes are held as
    arrays once, so that a batch is planned without per-sample Python objects."""

    def __init__(self, index: SplitIndex, cfg: DataConfig, *, train: bool) -> None:
        self.cfg = cfg
        self.train = train
        self.widths = np.array([sample.width for sample in index.samples], dtype=np.int64)
        self.heights = np.array([sample.height for sample in index.samples], dtype=np.int64)

    def plan(self, keys: list[SampleKey], *, size: int) -> tuple[np.ndarray, BatchPlan]:
        """The split indices of `keys` and their batch's plan, to be resized to `size`."""
        indices = np.fromiter((index for index, _ in keys), dtype=np.int64, count=len(keys))
        seeds = np.fromiter((seed for _, seed in keys), dtype=np.uint64, count=len(keys))
        return indices, plan_batch(self.widths[indices], self.heights[indices], seeds, self.cfg, train=self.train,
                                   size=size)


def plan_batch(widths: np.ndarray, heights: np.ndarray, seeds: np.ndarray, cfg: DataConfig, *, train: bool,
               size: int) -> BatchPlan:
    """The crops, flips, automatic augmentations and erasing boxes of a batch of images of `widths` x `heights`
    pixels with the sample seeds `seeds`, to be resized to `size`: numpy over the whole batch."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    return BatchPlan(
        crops=crops_for(widths, heights, seeds, cfg, train=train), size=size,
        auto_augment=auto_augments_for(seeds, cfg) if train and cfg.auto_augment != "none" else None,
        erase_boxes=erase_boxes_for(size, seeds, cfg) if train and cfg.random_erasing_prob > 0 else None)
