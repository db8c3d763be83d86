"""Which samples each rank sees at each step, as a pure function of (seed, epoch, step).

Training: every epoch is one seeded order of the whole split (a permutation of it; for a packed data set
the block-shuffled order of `shards.train_order`), cut into global batches of
batch_size x world_size; rank r takes the r-th slice of each. The samples of a global batch therefore
do not depend on the world size, and any step can be reproduced without replaying the ones before it,
which is what exact mid-epoch resume needs. The incomplete last global batch is dropped.
Validation: rank r takes every world_size-th sample from r; nothing is padded or dropped, so each
image is evaluated exactly once.

Each sample also carries its own augmentation seed, derived from (seed, epoch, index): random crops
and flips then do not depend on which worker process decodes the sample or on what ran before.

Repeated augmentation (Hoffer et al. 2020; torchvision's RASampler, timm's --aug-repeats) with N repeats:
an epoch takes the first 1/N of its order and yields each of those images N times, with N different
augmentation seeds, keeping the epoch's length. The copies of a block of batch_size images follow one
another as N consecutive micro-batches, so no BatchNorm batch holds two copies of an image: with N or more
ranks the copies land on different ranks, as with RASampler; with fewer, in successive accumulated
micro-batches. The layout depends on (seed, epoch, batch_size, N), never on the world size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

SampleKey = tuple[int, int]
"""(index into the split, augmentation seed of this sample in this epoch)."""


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch `epoch`'s permutation."""
    return (seed * 1_000_003 + epoch) % 2**63


def sample_seed(seed: int, epoch: int, index: int, copy: int = 0, num_samples: int = 0) -> int:
    """Augmentation seed of sample `index` in epoch `epoch` (of its `copy`-th repeat, in a split of
    `num_samples`, with repeated augmentation)."""
    return (epoch_seed(seed, epoch) * 10_000_019 + index + copy * num_samples) % 2**63


def repeated(order: list[int], *, repeats: int, block: int) -> list[tuple[int, int]]:
    """(index, copy) for an epoch of `order`'s length made of its first 1/`repeats`, each image `repeats`
    times: the copies of each `block` of images one block after another (see the module docstring)."""
    unique = order[:math.ceil(len(order) / repeats)]
    keys = [(index, copy) for start in range(0, len(unique), block) for copy in range(repeats)
            for index in unique[start:start + block]]
    return keys[:len(order)]


EpochOrder = Callable[[int, int], list[int]]
"""(seed, epoch) -> the order of a training epoch: every sample index once."""


def random_order(num_samples: int) -> EpochOrder:
    """A seeded permutation of the whole split per epoch (the order of a data set read from files)."""
    def order(seed: int, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        return torch.randperm(num_samples, generator=generator).tolist()
    return order


class ShardedBatchSampler:
    """Batches of `SampleKey`s for one rank, starting at a settable (epoch, batch) position."""

    def __init__(self, num_samples: int, *, batch_size: int, rank: int, world_size: int, seed: int,
                 train: bool, order: EpochOrder | None = None, repeats: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.train = train
        self.order = order or random_order(num_samples)
        """Training: the order of each epoch's samples."""
        self.repeats = repeats if train else 1
        """Training: copies of each image per epoch (repeated augmentation; 1: off)."""
        self.epoch = 0
        self.start_batch = 0

    def _check_start(self, start_batch: int) -> None:
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"batch {start_batch} is not in an epoch of {len(self)} batches")

    def __len__(self) -> int:
        """Batches this rank yields in a whole epoch."""
        if self.train:
            return self.num_samples // (self.batch_size * self.world_size)
        return math.ceil(len(range(self.rank, self.num_samples, self.world_size)) / self.batch_size)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration yield epoch `epoch` from batch `start_batch` on."""
        self._check_start(start_batch)
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[SampleKey]]:
        """The batches from the position `set_position` gave."""
        return self.batches(self.epoch, self.start_batch)

    def upcoming(self, epoch: int, start_batch: int = 0) -> list[int]:
        """The samples every rank together reads in epoch `epoch` from batch `start_batch` on, in order."""
        self._check_start(start_batch)
        if self.train:
            global_batch = self.batch_size * self.world_size
            keys = self.epoch_keys(epoch)[start_batch * global_batch:len(self) * global_batch]
            return [index for index, _ in keys]
        return list(range(start_batch * self.batch_size * self.world_size, self.num_samples))

    def epoch_keys(self, epoch: int) -> list[tuple[int, int]]:
        """Training: (index, copy) of every sample of epoch `epoch`, in order, all ranks together."""
        order = self.order(self.seed, epoch)
        if self.repeats == 1:
            return [(index, 0) for index in order]
        return repeated(order, repeats=self.repeats, block=self.batch_size)

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[list[SampleKey]]:
        """This rank's batches of epoch `epoch` from batch `start_batch` on."""
        self._check_start(start_batch)
        if self.train:
            keys = self.epoch_keys(epoch)
            global_batch = self.batch_size * self.world_size
            for batch in range(start_batch, len(self)):
                start = batch * global_batch + self.rank * self.batch_size
                yield [(i, sample_seed(self.seed, epoch, i, copy, self.num_samples))
                       for i, copy in keys[start:start + self.batch_size]]
        else:
            shard = list(range(self.rank, self.num_samples, self.world_size))
            for batch in range(start_batch, len(self)):
                yield [(i, 0) for i in shard[batch * self.batch_size:(batch + 1) * self.batch_size]]
