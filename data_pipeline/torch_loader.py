"""The baseline loader: PIL decoding and torchvision transforms in DataLoader worker processes."""

from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from configs.schema import DataConfig
from data_pipeline.index import SplitIndex

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images of a `SplitIndex`, decoded to RGB (grayscale, palette and CMYK files included) and transformed."""

    def __init__(self, index: SplitIndex, transform: v2.Transform) -> None:
        self.index = index
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.index.samples[i]
        with Image.open(self.index.root / path) as image:
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


def build_torch_loader(index: SplitIndex, cfg: DataConfig, *, train: bool, seed: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over `index`: shuffled, seeded and dropping the last partial batch when training;
    in order and keeping every image exactly once otherwise."""
    dataset = ImageDataset(index, train_transform(cfg) if train else val_transform(cfg))
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=pin_memory,
        # Fixes both the shuffling order and the per-worker augmentation seeds.
        generator=torch.Generator().manual_seed(seed),
    )
