"""Indexing and the baseline loader: labels agree across splits, val sees every image once, train is seeded."""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from configs.schema import DataConfig
from data_pipeline import DatasetError, build_loaders
from data_pipeline.index import scan_split


def digits_config(root: Path, **changes: object) -> DataConfig:
    base = DataConfig(dataset="folder", root=str(root), batch_size=64, num_workers=0, image_size=32,
                      min_crop_area=0.35, random_flip=False)
    return dataclasses.replace(base, **changes)


def test_val_loader_yields_every_image_exactly_once(digits_root: Path) -> None:
    loaders = build_loaders(digits_config(digits_root, batch_size=100), seed=0)
    labels = torch.cat([labels for _, labels in loaders.val])
    assert labels.numel() == loaders.num_val_images == 355  # 3 full batches and a partial one of 55
    expected = Counter(label for _, label in scan_split(digits_root, "val").samples)
    assert Counter(labels.tolist()) == expected


def test_train_loader_gives_full_normalized_batches(digits_root: Path) -> None:
    loaders = build_loaders(digits_config(digits_root), seed=0)
    assert len(loaders.train) == 1442 // 64
    images, labels = next(iter(loaders.train))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert images.mean().abs() < 2 and images.std() > 0.3


def test_train_order_and_augmentation_follow_the_seed(digits_root: Path) -> None:
    # With worker processes the loader's generator seeds each worker, so augmentation is reproducible too.
    def first_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return next(iter(build_loaders(digits_config(digits_root, num_workers=1), seed=seed).train))

    images_a, labels_a = first_batch(0)
    images_b, labels_b = first_batch(0)
    images_c, labels_c = first_batch(1)
    assert torch.equal(labels_a, labels_b) and torch.equal(images_a, images_b)
    assert not torch.equal(labels_a, labels_c)


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data.root='.*nowhere': no such folder"):
        build_loaders(digits_config(tmp_path / "nowhere"), seed=0)


def test_missing_split_names_the_folder(tmp_path: Path, digits_root: Path) -> None:
    shutil.copytree(digits_root / "train", tmp_path / "train")
    with pytest.raises(FileNotFoundError, match=rf"data set split not found: {tmp_path / 'val'}"):
        build_loaders(digits_config(tmp_path), seed=0)


def test_val_class_absent_from_train_is_an_error(tmp_path: Path, digits_root: Path) -> None:
    shutil.copytree(digits_root, tmp_path / "d")
    shutil.copytree(tmp_path / "d" / "val" / "3", tmp_path / "d" / "val" / "n99999999")
    with pytest.raises(DatasetError, match=r"class folders \['n99999999'\] are not in the training classes"):
        build_loaders(digits_config(tmp_path / "d"), seed=0)


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / ".DS_Store").write_text("")
    with pytest.raises(DatasetError, match=rf"{tmp_path / 'train'}: no images found"):
        build_loaders(digits_config(tmp_path), seed=0)


def test_digits_dataset_is_rendered_at_first_use(tmp_path: Path) -> None:
    loaders = build_loaders(digits_config(tmp_path / "fresh", dataset="digits"), seed=0)
    assert loaders.classes == tuple(str(d) for d in range(10))
    assert (loaders.num_train_images, loaders.num_val_images) == (1442, 355)
