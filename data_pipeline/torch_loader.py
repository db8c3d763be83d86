"""The baseline loader: PIL decoding, cropping and resizing in torch DataLoader worker processes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from configs.schema import DataConfig
from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, crop_for
from data_pipeline.index import SplitIndex
from data_pipeline.sharding import ShardedBatchSampler


SizedKey = tuple[int, int, int]
"""A `SampleKey` and the side the sample is resized to (its epoch's, with progressive resizing)."""


class SizedBatchSampler(Sampler[list[SizedKey]]):
    """A `ShardedBatchSampler`'s batches with the output size of their epoch in each key (the dataset runs in
    worker processes, which only see keys)."""

    def __init__(self, sampler: ShardedBatchSampler, cfg: DataConfig, *, train: bool) -> None:
        self.sampler = sampler
        self.cfg = cfg
        self.train = train

    def __len__(self) -> int:
        return len(self.sampler)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration yield epoch `epoch` from batch `start_batch` on."""
        self.sampler.set_position(epoch, start_batch)

    def __iter__(self) -> Iterator[list[SizedKey]]:
        size = self.cfg.crop_size(train=self.train, epoch=self.sampler.epoch)
        return ([(index, seed, size) for index, seed in batch] for batch in self.sampler)


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images of a `SplitIndex`, decoded to RGB (grayscale, palette and CMYK files included), cropped as
    `crops` says for the sample's key, resized to the model's input and normalised, as HWC tensors of `dtype`."""

    def __init__(self, index: SplitIndex, cfg: DataConfig, *, train: bool, dtype: torch.dtype) -> None:
        self.index = index
        self.cfg = cfg
        self.train = train
        self.dtype = dtype
        self.mean = torch.tensor(IMAGENET_MEAN) * 255
        self.std = torch.tensor(IMAGENET_STD) * 255

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, key: SizedKey) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        index, seed, side = key
        sample = self.index.samples[index]
        with Image.open(self.index.root / sample.path) as image:
            crop = crop_for(image.width, image.height, self.cfg, train=self.train, seed=seed)
            box = (crop.left, crop.top, crop.left + crop.width, crop.top + crop.height)
            size = (side, side)
            # One resampling of the window (PIL filters with antialiasing when it shrinks).
            resized = image.convert("RGB").resize(size, Image.Resampling.BILINEAR, box=box)
        if crop.flip:
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())
        return ((pixels.float() - self.mean) / self.std).to(self.dtype), sample.label


def collate_channels_last(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack HWC images into one NHWC buffer and view it as NCHW: a channels-last batch with no extra copy."""
    images = torch.stack([image for image, _ in samples]).permute(0, 3, 1, 2)
    return images, torch.tensor([label for _, label in samples], dtype=torch.int64)


class TorchLoader:
    """A DataLoader over a `ShardedBatchSampler`: `iter_epoch(epoch, start_batch)` yields one rank's batches."""

    def __init__(self, dataloader: DataLoader, sampler: SizedBatchSampler) -> None:
        self.dataloader = dataloader
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of epoch `epoch`, from batch `start_batch` on (the sampler is read when iteration starts)."""
        self.sampler.set_position(epoch, start_batch)
        return iter(self.dataloader)


def build_torch_loader(index: SplitIndex, cfg: DataConfig, *, train: bool, seed: int, rank: int, world_size: int,
                       pin_memory: bool, dtype: torch.dtype) -> TorchLoader:
    """This rank's loader over `index`: shuffled per epoch and dropping the last partial global batch when
    training; in order and keeping every image exactly once otherwise (see `sharding`). Batches are
    channels-last `dtype` images and int64 labels."""
    dataset = ImageDataset(index, cfg, train=train, dtype=dtype)
    sampler = SizedBatchSampler(ShardedBatchSampler(len(dataset), batch_size=cfg.batch_size, rank=rank,
                                                    world_size=world_size, seed=seed, train=train), cfg, train=train)
    dataloader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_channels_last,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        # Workers start from a clean server process, not a fork of this one: a fork copies none of the
        # threads of DALI, CUDA or the process group, and a library waiting on one of them hangs or crashes.
        multiprocessing_context="forkserver" if cfg.num_workers > 0 else None,
        pin_memory=pin_memory,
        # Each new iterator draws a base seed for its workers; from a private generator, the trainer's global
        # generators stay untouched (augmentation is seeded per sample and does not use that seed at all).
        generator=torch.Generator().manual_seed(seed),
    )
    return TorchLoader(dataloader, sampler)
