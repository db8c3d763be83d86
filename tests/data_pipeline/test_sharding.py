"""Sharding: each rank's share of every step, and each val image on exactly one rank."""

from __future__ import annotations

from collections import Counter

import pytest

from data_pipeline.sharding import ShardedBatchSampler


def batches(num_samples: int, batch_size: int, rank: int, world_size: int, *, train: bool, epoch: int = 0,
            start_batch: int = 0) -> list[list[int]]:
    sampler = ShardedBatchSampler(num_samples, batch_size=batch_size, rank=rank, world_size=world_size, seed=7,
                                  train=train)
    sampler.set_position(epoch, start_batch)
    return [[index for index, _ in batch] for batch in sampler]


@pytest.mark.parametrize(("num_samples", "world_size", "batch_size"), [(355, 2, 16), (355, 3, 7), (10, 4, 100)])
def test_val_shards_cover_every_sample_exactly_once(num_samples: int, world_size: int, batch_size: int) -> None:
    seen = [i for rank in range(world_size) for batch in batches(num_samples, batch_size, rank, world_size,
                                                                  train=False) for i in batch]
    assert sorted(seen) == list(range(num_samples))


def test_a_global_batch_is_the_same_whatever_the_world_size() -> None:
    one_rank = batches(1442, 64, 0, 1, train=True)
    two_ranks = [batches(1442, 32, rank, 2, train=True) for rank in range(2)]
    assert len(one_rank) == len(two_ranks[0]) == len(two_ranks[1]) == 1442 // 64
    for step, batch in enumerate(one_rank):
        assert batch == two_ranks[0][step] + two_ranks[1][step]


def test_training_drops_only_the_incomplete_last_global_batch() -> None:
    steps = batches(1442, 64, 0, 1, train=True)
    assert all(len(b) == 64 for b in steps) and len(steps) == 22
    assert len({i for b in steps for i in b}) == 22 * 64


def test_each_epoch_is_a_new_permutation_and_samples_have_per_epoch_seeds() -> None:
    assert batches(100, 10, 0, 1, train=True, epoch=0) != batches(100, 10, 0, 1, train=True, epoch=1)
    sampler = ShardedBatchSampler(100, batch_size=10, rank=0, world_size=1, seed=7, train=True)
    seeds_epoch0 = {i: s for batch in sampler for i, s in batch}
    sampler.set_position(1)
    seeds_epoch1 = {i: s for batch in sampler for i, s in batch}
    assert len(set(seeds_epoch0.values())) == 100
    assert all(seeds_epoch0[i] != seeds_epoch1[i] for i in seeds_epoch0)


def test_start_batch_skips_without_changing_the_rest() -> None:
    assert batches(1442, 64, 1, 2, train=True, start_batch=5) == batches(1442, 64, 1, 2, train=True)[5:]


def keys(num_samples: int, batch_size: int, rank: int, world_size: int, repeats: int) -> list[list[tuple[int, int]]]:
    sampler = ShardedBatchSampler(num_samples, batch_size=batch_size, rank=rank, world_size=world_size, seed=7,
                                  train=True, repeats=repeats)
    return [list(batch) for batch in sampler]


def test_repeated_augmentation_shows_a_third_of_the_images_three_times_with_three_seeds() -> None:
    epoch = [key for batch in keys(1442, 32, 0, 1, repeats=3) for key in batch]
    assert len(epoch) == 1442 // 32 * 32  # the epoch keeps its length
    counts = Counter(index for index, _ in epoch)
    assert set(counts.values()) == {3} and len(counts) == 480  # 45 steps of 32: 15 blocks of 32 images x 3
    assert len({seed for _, seed in epoch}) == len(epoch)  # every copy is augmented differently
    # No micro-batch (a BatchNorm batch) holds two copies of an image.
    assert all(len({index for index, _ in batch}) == len(batch) for batch in keys(1442, 32, 0, 1, repeats=3))
    # Negative control: without repeats every image of the epoch is distinct.
    assert len({index for batch in keys(1442, 32, 0, 1, repeats=1) for index, _ in batch}) == 1440


def test_repeated_augmentation_is_independent_of_the_world_size_and_spreads_copies_over_ranks() -> None:
    one_rank = keys(1442, 32, 0, 1, repeats=2)
    two_ranks = [keys(1442, 32, rank, 2, repeats=2) for rank in range(2)]
    # Step s of two ranks is micro-batches 2s and 2s + 1 of one rank (accumulation keeps the global batch).
    assert [a + b for a, b in zip(*two_ranks, strict=True)] == [
        one_rank[2 * s] + one_rank[2 * s + 1] for s in range(len(one_rank) // 2)]
    # With as many ranks as repeats, the two ranks train on the same images at each step, as with torchvision's
    # RASampler, each with its own augmentation.
    for a, b in zip(*two_ranks, strict=True):
        assert [index for index, _ in a] == [index for index, _ in b]
        assert all(seed_a != seed_b for (_, seed_a), (_, seed_b) in zip(a, b, strict=True))
