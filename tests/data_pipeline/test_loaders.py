"""Both loaders (DALI on CPU threads and the torch baseline): val sees every image once, train is seeded and
resumable at any batch, and a tree without an index is refused."""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from configs.schema import DataConfig, InvalidValue
from data_pipeline import DatasetError, build_loaders
from data_pipeline.prepare import read_index


def digits_config(root: Path, **changes: object) -> DataConfig:
    base = DataConfig(dataset="folder", root=str(root), batch_size=64, loader_workers=0, image_size=32,
                      min_crop_area=0.35, random_flip=False, loader="torch")
    return dataclasses.replace(base, **changes)


@pytest.fixture(params=["torch", "dali"])
def loader(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_val_loader_yields_every_image_exactly_once(digits_root: Path, loader: str) -> None:
    loaders = build_loaders(digits_config(digits_root, batch_size=100, loader=loader), seed=0)
    labels = torch.cat([labels for _, labels in loaders.val.iter_epoch(0)])
    assert labels.numel() == loaders.num_val_images == 355  # 3 full batches and a partial one of 55
    expected = Counter(s.label for s in read_index(digits_root / "index", digits_root, "val").samples)
    assert Counter(labels.tolist()) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_train_loader_gives_full_normalized_channels_last_batches(digits_root: Path, loader: str,
                                                                  dtype: torch.dtype) -> None:
    loaders = build_loaders(digits_config(digits_root, loader=loader, loader_workers=1), seed=0, dtype=dtype)
    assert len(loaders.train) == 1442 // 64
    images, labels = next(loaders.train.iter_epoch(0))
    assert images.shape == (64, 3, 32, 32) and images.dtype == dtype
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    assert labels.dtype == torch.int64
    assert images.mean().abs() < 2 and images.std() > 0.3


def first_batch(root: Path, loader: str, *, seed: int = 0, epoch: int = 0,
                workers: int = 0) -> tuple[torch.Tensor, ...]:
    loaders = build_loaders(digits_config(root, loader_workers=workers, dali_threads=max(1, workers), loader=loader),
                            seed=seed)
    return tuple(next(loaders.train.iter_epoch(epoch)))


def test_train_batches_follow_the_seed_and_epoch_not_the_worker_count(digits_root: Path, loader: str) -> None:
    images, labels = first_batch(digits_root, loader, workers=1)
    # Augmentation is seeded per sample, so decoding in 2 worker processes (threads for DALI) gives the same.
    images_workers, labels_workers = first_batch(digits_root, loader, workers=2)
    assert torch.equal(labels, labels_workers) and torch.equal(images, images_workers)
    assert not torch.equal(labels, first_batch(digits_root, loader, seed=1)[1])
    assert not torch.equal(labels, first_batch(digits_root, loader, epoch=1)[1])


def test_an_epoch_can_start_at_any_batch(digits_root: Path, loader: str) -> None:
    train = build_loaders(digits_config(digits_root, batch_size=200, loader=loader), seed=0).train
    whole = list(train.iter_epoch(3))
    unfinished = train.iter_epoch(2)
    next(unfinished)  # an epoch left unfinished (as with gradient accumulation) must not leak into the next
    tail = list(train.iter_epoch(3, start_batch=4))
    assert len(whole) == 7 and len(tail) == 3
    for (images_a, labels_a), (images_b, labels_b) in zip(whole[4:], tail, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data.root='.*nowhere': no such folder"):
        build_loaders(digits_config(tmp_path / "nowhere"), seed=0)


def test_a_tree_without_an_index_is_refused_with_the_command_that_makes_one(tmp_path: Path,
                                                                          digits_root: Path) -> None:
    shutil.copytree(digits_root / "train", tmp_path / "train")
    shutil.copytree(digits_root / "val", tmp_path / "val")
    with pytest.raises(DatasetError, match=rf"no complete index at {tmp_path / 'index'}.*data prepare {tmp_path}"):
        build_loaders(digits_config(tmp_path), seed=0)


def test_digits_dataset_is_rendered_at_first_use(tmp_path: Path) -> None:
    loaders = build_loaders(digits_config(tmp_path / "fresh", dataset="digits"), seed=0)
    assert loaders.classes == tuple(str(d) for d in range(10))
    assert (loaders.num_train_images, loaders.num_val_images) == (1442, 355)


def test_validation_can_use_another_resolution_than_training(digits_root: Path) -> None:
    # Train at 16 px, validate at 24 (FixRes): both loaders, the same validation images to rounding.
    val = {}
    for loader in ("torch", "dali"):
        loaders = build_loaders(digits_config(digits_root, loader=loader, image_size=16, val_image_size=24), seed=0)
        train_images, _ = next(loaders.train.iter_epoch(0))
        assert train_images.shape[-2:] == (16, 16)
        val[loader] = torch.cat([images for images, _ in loaders.val.iter_epoch(0)])
        assert val[loader].shape == (355, 3, 24, 24)
    per_image = (val["dali"] - val["torch"]).abs().mean(dim=(1, 2, 3))
    assert per_image.max() < 0.03  # decoder/resampler rounding (see test_dali)
    # Without val_image_size, validation uses the training size.
    at_train_size = build_loaders(digits_config(digits_root, image_size=16), seed=0).val
    assert next(at_train_size.iter_epoch(0))[0].shape[-2:] == (16, 16)


def test_progressive_resizing_gives_each_epoch_its_size() -> None:
    cfg = DataConfig(image_size=192, progressive_start_size=160, progressive_start_epoch=2, progressive_end_epoch=6,
                     progressive_multiple=8)
    # Epochs 0-2 at the start size, a linear ramp in multiples of 8, then image_size from epoch 6 on.
    assert [cfg.crop_size(train=True, epoch=epoch) for epoch in range(8)] == [160, 160, 160, 168, 176, 184, 192, 192]
    assert cfg.crop_size(train=False) == cfg.crop_size(train=True) == 192  # validation and the final size
    rounded = dataclasses.replace(cfg, progressive_multiple=32)  # FFCV's rounding: to the nearer multiple
    assert [rounded.crop_size(train=True, epoch=epoch) for epoch in range(2, 7)] == [160, 160, 192, 192, 192]
    with pytest.raises(InvalidValue, match="progressive_end_epoch=2: must be after progressive_start_epoch=2"):
        dataclasses.replace(cfg, progressive_end_epoch=2)


def test_both_loaders_train_each_epoch_at_its_progressive_size(digits_root: Path) -> None:
    changes = {"image_size": 16, "progressive_start_size": 8, "progressive_end_epoch": 2, "progressive_multiple": 4}
    first: dict[str, torch.Tensor] = {}
    for loader in ("torch", "dali"):
        loaders = build_loaders(digits_config(digits_root, loader=loader, **changes), seed=0)
        sizes = [next(loaders.train.iter_epoch(epoch, start_batch=3))[0].shape[-1] for epoch in range(4)]
        assert sizes == [8, 12, 16, 16]
        assert next(loaders.val.iter_epoch(0))[0].shape[-1] == 16
        first[loader] = next(loaders.train.iter_epoch(1))[0]
    # The same images at 12 px from both, to decoder/resampler rounding (see test_dali).
    assert (first["dali"] - first["torch"]).abs().mean(dim=(1, 2, 3)).max() < 0.03


def test_repeated_augmentation_gives_each_image_again_with_another_crop(digits_root: Path, loader: str) -> None:
    config = digits_config(digits_root, loader=loader, batch_size=32, repeated_augmentation=2)
    batches = build_loaders(config, seed=0).train.iter_epoch(0)
    (images_a, labels_a), (images_b, labels_b) = next(batches), next(batches)
    # The second micro-batch holds the same images as the first, each augmented again (from its own seed).
    assert torch.equal(labels_a, labels_b)
    assert all(not torch.equal(a, b) for a, b in zip(images_a, images_b, strict=True))
    # Negative control: without repeats the next micro-batch holds other images.
    plain = build_loaders(dataclasses.replace(config, repeated_augmentation=1), seed=0).train.iter_epoch(0)
    assert not torch.equal(next(plain)[1], next(plain)[1])
