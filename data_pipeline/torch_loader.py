"""The baseline loader: PIL decoding, cropping and resizing in torch DataLoader worker processes."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from configs.schema import DataConfig
from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, BatchPlanner, Box, Crop, erase_box_of
from data_pipeline.auto_augment import AUTO_AUGMENT_FILL, AugmentOp
from data_pipeline.index import SplitIndex
from data_pipeline.sharding import ShardedBatchSampler

if TYPE_CHECKING:
    from data_pipeline.shard_cache import ShardSource


class SampleJob(NamedTuple):
    """What a worker process does to one sample: its place in the index and its share of the batch's plan."""

    sample: int
    """Index into the split."""
    size: int
    """The side the sample is resized to (its epoch's, with progressive resizing)."""
    crop: Crop
    """Window and flip."""
    ops: tuple[AugmentOp, ...]
    """Automatic augmentation, in order (empty: none)."""
    erase: Box | None
    """Random erasing's box, if erased."""


class PlannedBatchSampler(Sampler[list[SampleJob]]):
    """A `ShardedBatchSampler`'s batches, each planned at once (`augment.plan_batch`, the DALI loader's plan)
    in this process, and handed to the worker processes sample by sample."""

    def __init__(self, sampler: ShardedBatchSampler, index: SplitIndex, cfg: DataConfig, *, train: bool,
                 source: ShardSource | None) -> None:
        self.sampler = sampler
        self.source = source
        self.cfg = cfg
        self.train = train
        self.planner = BatchPlanner(index, cfg, train=train)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration yield epoch `epoch` from batch `start_batch` on."""
        self.sampler.set_position(epoch, start_batch)

    def __iter__(self) -> Iterator[list[SampleJob]]:
        size = self.cfg.crop_size(train=self.train, epoch=self.sampler.epoch)
        if self.source is not None:
            self.source.schedule(self.sampler.upcoming(self.sampler.epoch, self.sampler.start_batch))
        for keys in self.sampler:
            indices, plan = self.planner.plan(keys, size=size)
            if self.source is not None:
                self.source.read_ahead(indices.tolist())  # the workers then find the shards fetched
            boxes = plan.erase_boxes
            yield [SampleJob(index, size, plan.crops.crop(i),
                             plan.auto_augment.ops(i) if plan.auto_augment is not None else (),
                             erase_box_of(boxes[i]) if boxes is not None else None)
                   for i, index in enumerate(indices.tolist())]


ENHANCEMENTS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "brightness": F.adjust_brightness, "color": F.adjust_saturation, "contrast": F.adjust_contrast,
    "sharpness": F.adjust_sharpness}
"""The operations whose parameter is an enhancement factor (1: unchanged), as PIL's ImageEnhance defines them."""


def apply_auto_augment(image: torch.Tensor, ops: tuple[AugmentOp, ...], policy: str) -> torch.Tensor:
    """`ops` applied in turn to a uint8 CHW image with torchvision's operations (as its TrivialAugmentWide and
    RandAugment apply them: shears about the top-left corner; bilinear resampling here). They agree with the
    DALI pipeline's to resampling rounding, except equalize (torchvision follows PIL's formula, DALI OpenCV's)."""
    side = image.shape[-1]
    affine = {"interpolation": InterpolationMode.BILINEAR, "fill": [float(AUTO_AUGMENT_FILL)] * 3}
    for op in ops:
        magnitude = op.magnitude(policy)
        if op.name == "shear_x" or op.name == "shear_y":
            # DALI's shear (x += factor * y) is torchvision's of the opposite angle: signs are drawn at random
            # either way, and this way both loaders deliver the same image.
            degrees = -math.degrees(math.atan(magnitude))
            shear = [degrees, 0.0] if op.name == "shear_x" else [0.0, degrees]
            image = F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0], **affine)
        elif op.name == "translate_x" or op.name == "translate_y":
            offset = magnitude * side
            translate = [offset, 0.0] if op.name == "translate_x" else [0.0, offset]
            image = F.affine(image, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], **affine)
        elif op.name == "rotate":
            image = F.rotate(image, magnitude, **affine)
        elif op.name in ENHANCEMENTS:
            image = ENHANCEMENTS[op.name](image, 1.0 + magnitude)
        elif op.name == "posterize":
            image = F.posterize(image, round(magnitude))
        elif op.name == "solarize":
            image = F.solarize(image, magnitude)
        elif op.name == "auto_contrast":
            image = F.autocontrast(image)
        elif op.name == "equalize":
            image = F.equalize(image)
    return image


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images of a `SplitIndex`, decoded to RGB (grayscale, palette and CMYK files included), cropped, resized,
    augmented as each `SampleJob` says, and normalised, as HWC tensors of `dtype`."""

    def __init__(self, index: SplitIndex, cfg: DataConfig, *, train: bool, dtype: torch.dtype,
                 source: ShardSource | None) -> None:
        self.index = index
        self.source = source
        """A packed data set's shards, which the encoded images are read from; None: files."""
        self.cfg = cfg
        self.train = train
        """Whether this is a training split (the jobs then carry training crops and augmentation)."""
        self.dtype = dtype
        self.mean = torch.tensor(IMAGENET_MEAN) * 255
        self.std = torch.tensor(IMAGENET_STD) * 255

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, job: SampleJob) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        sample = self.index.samples[job.sample]
        crop = job.crop
        encoded = (io.BytesIO(self.source.read(job.sample)) if self.source is not None
                   else self.index.root / sample.path)
        with Image.open(encoded) as image:
            box = (crop.left, crop.top, crop.left + crop.width, crop.top + crop.height)
            # One resampling of the window (PIL filters with antialiasing when it shrinks).
            resized = image.convert("RGB").resize((job.size, job.size), Image.Resampling.BILINEAR, box=box)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())
        if job.ops:
            pixels = apply_auto_augment(pixels.permute(2, 0, 1), job.ops, self.cfg.auto_augment).permute(1, 2, 0)
        if crop.flip:  # after the automatic augmentation, as in the DALI pipeline
            pixels = pixels.flip(1)
        normalized = (pixels.float() - self.mean) / self.std
        if (erase := job.erase) is not None:
            normalized[erase.top:erase.top + erase.height, erase.left:erase.left + erase.width] = 0
        return normalized.to(self.dtype), sample.label


def collate_channels_last(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack HWC images into one NHWC buffer and view it as NCHW: a channels-last batch with no extra copy."""
    images = torch.stack([image for image, _ in samples]).permute(0, 3, 1, 2)
    return images, torch.tensor([label for _, label in samples], dtype=torch.int64)


class TorchLoader:
    """A DataLoader over a `ShardedBatchSampler`: `iter_epoch(epoch, start_batch)` yields one rank's batches."""

    def __init__(self, dataloader: DataLoader, sampler: PlannedBatchSampler) -> None:
        self.dataloader = dataloader
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of epoch `epoch`, from batch `start_batch` on (the sampler is read when iteration starts)."""
        self.sampler.set_position(epoch, start_batch)
        return iter(self.dataloader)


def build_torch_loader(index: SplitIndex, cfg: DataConfig, *, train: bool, seed: int, rank: int, world_size: int,
                       pin_memory: bool, dtype: torch.dtype, source: ShardSource | None = None) -> TorchLoader:
    """This rank's loader over `index`: shuffled per epoch and dropping the last partial global batch when
    training; in order and keeping every image exactly once otherwise (see `sharding`). Batches are
    channels-last `dtype` images and int64 labels."""
    dataset = ImageDataset(index, cfg, train=train, dtype=dtype, source=source)
    sampler = PlannedBatchSampler(ShardedBatchSampler(len(dataset), batch_size=cfg.batch_size, rank=rank,
                                                      world_size=world_size, seed=seed, train=train,
                                                      order=source.order if source is not None else None,
                                                      repeats=cfg.repeated_augmentation),
                                  index, cfg, train=train, source=source)
    dataloader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_channels_last,
        num_workers=cfg.loader_workers,
        persistent_workers=cfg.loader_workers > 0,
        # Workers start from a clean server process, not a fork of this one: a fork copies none of the
        # threads of DALI, CUDA or the process group, and a library waiting on one of them hangs or crashes.
        multiprocessing_context="forkserver" if cfg.loader_workers > 0 else None,
        pin_memory=pin_memory,
        # Each new iterator draws a base seed for its workers; from a private generator, the trainer's global
        # generators stay untouched (augmentation is seeded per sample and does not use that seed at all).
        generator=torch.Generator().manual_seed(seed),
    )
    return TorchLoader(dataloader, sampler)
