"""Synthetic data: one random batch made once, already on the device, served as every batch.

For compute benchmarks: it measures the model step with no decoding, no host-to-device copy and no
data wait. Its accuracy means nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from configs.schema import DataConfig


class SyntheticLoader:
    """`num_batches` per epoch of the same (images, labels) tensors, channels-last `dtype` on `device`."""

    def __init__(self, cfg: DataConfig, *, train: bool, num_batches: int, seed: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        generator = torch.Generator().manual_seed(seed)
        shape = (cfg.batch_size, 3, cfg.crop_size(train=train), cfg.crop_size(train=train))
        self.images = torch.randn(shape, generator=generator).to(device, dtype, memory_format=torch.channels_last)
        self.labels = torch.randint(0, cfg.synthetic_classes, (cfg.batch_size,), generator=generator).to(device)
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(start_batch, self.num_batches):
            yield self.images, self.labels
