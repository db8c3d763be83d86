"""Synthetic data: full global batches of fixed device tensors, and labels the model can take."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import trainer
from configs import IncompatibleSettings, load_config
from data_pipeline import build_loaders
from trainer.dist import single_process_context


def test_synthetic_loaders_shard_the_configured_images_into_full_global_batches() -> None:
    cfg = load_config("quickstart", ["data.dataset=synthetic", "data.synthetic_images=100", "data.image_size=32",
                                     "data.synthetic_classes=7", "data.batch_size=8"]).data
    loaders = build_loaders(cfg, seed=0, rank=1, world_size=2)
    assert len(loaders.train) == 100 // 16 and len(loaders.val) == 1 and len(loaders.classes) == 7
    batches = list(loaders.train.iter_epoch(0, start_batch=2))
    assert len(batches) == 4
    images, labels = batches[0]
    assert images.shape == (8, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and int(labels.max()) < 7
    # Ranks get different batches (seeded by rank), each the same tensor every step.
    other = next(iter(build_loaders(cfg, seed=0, rank=0, world_size=2).train.iter_epoch(0)))[0]
    assert not torch.equal(other, images) and batches[1][0] is images


def test_synthetic_classes_must_match_the_model(tmp_path: Path) -> None:
    cfg = load_config("quickstart", ["data.dataset=synthetic", "data.synthetic_images=64",
                                     "data.synthetic_classes=1000"])
    with pytest.raises(IncompatibleSettings, match="model.num_classes=10 but data.synthetic_classes has 1000 classes"):
        trainer.run(cfg, single_process_context(), [])
