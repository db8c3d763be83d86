"""The baseline loader: PIL decoding and torchvision transforms in DataLoader worker processes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from configs.schema import DataConfig
from data_pipeline.index import SplitIndex
from data_pipeline.sharding import SampleKey, ShardedBatchSampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images of a `SplitIndex`, decoded to RGB (grayscale, palette and CMYK files included) and transformed
    with the random generator seeded by the sample's own key."""

    def __init__(self, index: SplitIndex, transform: v2.Transform) -> None:
        self.index = index
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        index, seed = key
        path, label = self.index.samples[index]
        with Image.open(self.index.root / path) as image, torch.random.fork_rng(devices=[]):
            # fork_rng: the caller's generator is untouched (it is the trainer's when num_workers=0).
            torch.manual_seed(seed)
            return self.transform(image.convert("RGB")), label


def train_transform(cfg: DataConfig) -> v2.Transform:
    """Inception-style random-resized crop, optional flip, normalise."""
    steps: list[v2.Transform] = [v2.RandomResizedCrop(cfg.image_size, scale=(cfg.min_crop_area, 1.0), antialias=True)]
    if cfg.random_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, *_to_normalized_tensor()])


def val_transform(cfg: DataConfig) -> v2.Transform:
    """Shorter side to image_size / val_crop_ratio, centre crop, normalise."""
    return v2.Compose([
        v2.Resize(round(cfg.image_size / cfg.val_crop_ratio), antialias=True),
        v2.CenterCrop(cfg.image_size),
        *_to_normalized_tensor(),
    ])


def _to_normalized_tensor() -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


class TorchLoader:
    """A DataLoader over a `ShardedBatchSampler`: `iter_epoch(epoch, start_batch)` yields one rank's batches."""

    def __init__(self, dataloader: DataLoader, sampler: ShardedBatchSampler) -> None:
        self.dataloader = dataloader
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of epoch `epoch`, from batch `start_batch` on (the sampler is read when iteration starts)."""
        self.sampler.set_position(epoch, start_batch)
        return iter(self.dataloader)


def build_torch_loader(index: SplitIndex, cfg: DataConfig, *, train: bool, seed: int, rank: int, world_size: int,
                       pin_memory: bool) -> TorchLoader:
    """This rank's loader over `index`: shuffled per epoch and dropping the last partial global batch when
    training; in order and keeping every image exactly once otherwise (see `sharding`)."""
    dataset = ImageDataset(index, train_transform(cfg) if train else val_transform(cfg))
    sampler = ShardedBatchSampler(len(dataset), batch_size=cfg.batch_size, rank=rank, world_size=world_size,
                                  seed=seed, train=train)
    dataloader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=pin_memory,
        # Each new iterator draws a base seed for its workers; from a private generator, the trainer's global
        # generators stay untouched (augmentation is seeded per sample and does not use that seed at all).
        generator=torch.Generator().manual_seed(seed),
    )
    return TorchLoader(dataloader, sampler)
