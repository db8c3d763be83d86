"""Mixup and CutMix: targets are probabilities that match what was mixed, draws follow (seed, step,
micro-batch) only, and a micro-batch left unmixed keeps its images and one-hot targets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from configs.schema import DataConfig
from trainer.mix import BatchMixer

NUM_CLASSES = 10


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is flat with value i; labels 0..n-1, so an image and its partner (n-1-i) differ."""
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 16, 16).contiguous()
    return images.to(memory_format=torch.channels_last), torch.arange(n)


def mixer(**changes: object) -> BatchMixer:
    return BatchMixer(dataclasses.replace(DataConfig(), **changes), num_classes=NUM_CLASSES, seed=0)


def test_mixup_blends_images_and_targets_by_the_same_weight() -> None:
    images, labels = batch()
    [(mixed, targets)] = mixer(mixup_alpha=0.4).mix([(images, labels)], step=3)
    assert targets.shape == (8, NUM_CLASSES) and torch.allclose(targets.sum(1), torch.ones(8))
    lam = targets[0, 0].item()
    assert 0 < lam < 1 and targets[0, 7].item() == pytest.approx(1 - lam)
    assert torch.allclose(mixed, images * lam + images.flip(0) * (1 - lam))


def test_cutmix_pastes_a_box_whose_area_matches_the_targets() -> None:
    images, labels = batch()
    [(mixed, targets)] = mixer(cutmix_alpha=1.0).mix([(images, labels)], step=5)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    for i in range(8):
        kept = (mixed[i] == i).float().mean().item()  # the share of image i's own pixels
        assert kept == pytest.approx(targets[i, i].item()) and 1 - kept == pytest.approx(targets[i, 7 - i].item())
    assert (mixed != images).any()


def test_draws_follow_seed_step_and_micro_batch_only() -> None:
    images, labels = batch()
    both = mixer(mixup_alpha=0.4, cutmix_alpha=1.0)
    first = both.mix([(images, labels), (images, labels)], step=7)
    again = both.mix([(images, labels), (images, labels)], step=7)
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    later = both.mix([(images, labels)], step=8)[0]
    other_seed = BatchMixer(both.cfg, num_classes=NUM_CLASSES, seed=1).mix([(images, labels)], step=7)[0]
    assert not torch.equal(later[1], first[0][1]) and not torch.equal(other_seed[1], first[0][1])
    assert not torch.equal(first[0][1], first[1][1])  # each micro-batch its own draw


def test_unmixed_batches_keep_their_images_and_one_hot_targets() -> None:
    images, labels = batch()
    for quiet in (mixer(), mixer(mixup_alpha=0.4, mix_prob=0.0)):
        (kept, targets), = quiet.mix([(images, labels)], step=1)
        assert torch.equal(kept, images)
        if quiet.enabled:
            assert torch.equal(targets, torch.nn.functional.one_hot(labels, NUM_CLASSES).float())
