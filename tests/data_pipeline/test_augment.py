"""Crops, automatic augmentation and random erasing draws: functions of the sample's seed alone (drawn for a
whole batch at once), covering their whole space, with torchvision's rules and magnitude ranges."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from configs.schema import DataConfig
from data_pipeline.augment import ERASE_AREAS, crop_for, erase_box_for, plan_batch
from data_pipeline.auto_augment import (AUTO_AUGMENT_OPS, MAGNITUDE_RANGES, NUM_MAGNITUDE_BINS, AugmentOp,
                                        auto_augment_for)

SEEDS = range(3000)


def test_trivial_augment_draws_one_op_per_image_from_the_seed_covering_every_op_bin_and_sign() -> None:
    cfg = DataConfig(auto_augment="trivial")
    draws = [auto_augment_for(cfg, seed=seed) for seed in SEEDS]
    assert draws == [auto_augment_for(cfg, seed=seed) for seed in SEEDS]  # the seed alone decides
    assert all(len(ops) == 1 for ops in draws)
    assert {ops[0].op for ops in draws} == set(range(len(AUTO_AUGMENT_OPS)))
    assert {ops[0].magnitude_bin for ops in draws} == set(range(NUM_MAGNITUDE_BINS))
    assert Counter(ops[0].negate for ops in draws)[True] == pytest.approx(len(SEEDS) / 2, rel=0.1)
    # Different seeds: different draws for nearly every pair of neighbours (same op and bin by chance: 1/434).
    assert sum(a == b for a, b in zip(draws[:-1], draws[1:], strict=True)) < 30
    assert auto_augment_for(DataConfig(), seed=7) == ()


def test_rand_augment_draws_its_number_of_ops_at_its_magnitude() -> None:
    cfg = DataConfig(auto_augment="rand", rand_augment_ops=3, rand_augment_magnitude=7)
    draws = [auto_augment_for(cfg, seed=seed) for seed in SEEDS]
    assert all(len(ops) == 3 and {op.magnitude_bin for op in ops} == {7} for ops in draws)
    assert {op.op for ops in draws for op in ops} == set(range(len(AUTO_AUGMENT_OPS)))


def test_rand_augment_magnitude_noise_and_skipping_follow_timms_rand_m6_mstd05() -> None:
    plain = DataConfig(auto_augment="rand", rand_augment_magnitude=18)
    timm_like = DataConfig(auto_augment="rand", rand_augment_magnitude=18, rand_augment_magnitude_std=1.5,
                           rand_augment_prob=0.5)
    draws = [(auto_augment_for(plain, seed=seed), auto_augment_for(timm_like, seed=seed)) for seed in SEEDS]
    bins = np.array([op.magnitude_bin for _, ops in draws for op in ops])
    # A normal spread of 1.5 bins around 18, rounded: about 25% of the draws stay at 18 (timm's mstd0.5 on its
    # 0..10 scale); without noise all do.
    assert bins.mean() == pytest.approx(18, abs=0.1) and bins.std() == pytest.approx(1.5, abs=0.1)
    assert 0.2 < float(np.mean(bins == 18)) < 0.3
    identity = AUTO_AUGMENT_OPS.index("identity")
    # Half the drawn operations are skipped (become the identity); the others are the plain draw's.
    kept = [(a.op, b.op) for ops_a, ops_b in draws for a, b in zip(ops_a, ops_b, strict=True)]
    skipped = sum(b == identity != a for a, b in kept)
    assert skipped / len(kept) == pytest.approx(0.5 * (1 - 1 / len(AUTO_AUGMENT_OPS)), abs=0.03)
    assert all(b in (a, identity) for a, b in kept)


@pytest.mark.parametrize(("policy", "space"), [("trivial", v2.TrivialAugmentWide), ("rand", v2.RandAugment)])
def test_magnitude_ranges_are_torchvisions(policy: str, space: type) -> None:
    side = 224
    units = {"translate_x": side, "translate_y": side, "solarize": 1 / 255}  # torchvision's units
    for camel, (magnitudes_of, signed) in space._AUGMENTATION_SPACE.items():
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()
        magnitudes = magnitudes_of(NUM_MAGNITUDE_BINS, side, side)
        ours = [AugmentOp(AUTO_AUGMENT_OPS.index(name), b, False).magnitude(policy) * units.get(name, 1)
                for b in range(NUM_MAGNITUDE_BINS)]
        if magnitudes is None:
            assert set(ours) == {0}, name
        elif name == "posterize":
            assert [round(bits) for bits in ours] == magnitudes.tolist(), name
        else:
            assert ours == pytest.approx(magnitudes.tolist(), abs=1e-4), name
        assert MAGNITUDE_RANGES[policy][name].signed == signed, name
    assert AugmentOp(AUTO_AUGMENT_OPS.index("rotate"), 30, True).magnitude("trivial") == -135


def test_random_erasing_boxes_follow_the_seed_and_its_probability_and_fit_the_image() -> None:
    size = 32
    cfg = DataConfig(random_erasing_prob=0.25)
    boxes = [erase_box_for(size, cfg, seed=seed) for seed in SEEDS]
    assert boxes == [erase_box_for(size, cfg, seed=seed) for seed in SEEDS]
    erased = [box for box in boxes if box is not None]
    assert len(erased) == pytest.approx(0.25 * len(SEEDS), rel=0.15)
    for box in erased:
        assert 0 <= box.top and box.top + box.height <= size and 0 <= box.left and box.left + box.width <= size
        # Rounding each side to whole pixels moves the area a little off the drawn fraction.
        assert ERASE_AREAS[0] * 0.6 < box.height * box.width / size**2 < ERASE_AREAS[1] * 1.3
    assert len(set(erased)) > len(erased) / 3  # boxes differ from image to image
    assert all(erase_box_for(size, DataConfig(), seed=seed) is None for seed in range(100))


def test_a_batch_plan_is_each_images_own_plan_drawn_alone() -> None:
    cfg = DataConfig(auto_augment="rand", random_erasing_prob=0.5, min_crop_area=0.08)
    rng = np.random.default_rng(0)
    widths, heights = rng.integers(200, 900, 500), rng.integers(200, 900, 500)
    widths[:3], heights[:3] = (4000, 20, 1), (20, 4000, 1)  # no try fits: the centred fallback
    seeds = rng.integers(0, 2**63, 500, dtype=np.uint64)
    plan = plan_batch(widths, heights, seeds, cfg, train=True, size=64)
    assert plan.auto_augment is not None and plan.erase_boxes is not None
    for i in range(len(seeds)):
        crop = crop_for(int(widths[i]), int(heights[i]), cfg, train=True, seed=int(seeds[i]))
        assert plan.crops.crop(i) == crop
        assert 0 <= crop.left and crop.left + crop.width <= widths[i] and 0 < crop.width
        assert 0 <= crop.top and crop.top + crop.height <= heights[i] and 0 < crop.height
        assert plan.auto_augment.ops(i) == auto_augment_for(cfg, seed=int(seeds[i]))
        box = erase_box_for(64, cfg, seed=int(seeds[i]))
        assert tuple(plan.erase_boxes[i]) == (tuple(box) if box else (0, 0, 0, 0))
    assert plan.crops.crop(0)[:4] == ((4000 - 27) // 2, 0, 27, 20) and plan.crops.crop(2)[:4] == (0, 0, 1, 1)
    # Inception's rule: areas from min_crop_area up, log-uniform aspect ratios within [3/4, 4/3], half flipped.
    fitted = np.arange(3, 500)
    area = plan.crops.width[fitted] * plan.crops.height[fitted] / (widths[fitted] * heights[fitted])
    aspect = plan.crops.width[fitted] / plan.crops.height[fitted]
    torch.manual_seed(0)
    reference = [(lambda top, left, h, w: h * w / (widths[i] * heights[i]))(*v2.RandomResizedCrop.get_params(
        torch.empty(1, int(heights[i]), int(widths[i])), scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])) for i in fitted]
    assert area.min() > 0.06 and area.max() <= 1
    assert np.median(area) == pytest.approx(np.median(reference), abs=0.05)
    assert area.mean() == pytest.approx(np.mean(reference), abs=0.05)
    assert aspect.min() > 0.7 and aspect.max() < 1.42
    assert plan.crops.flip.mean() == pytest.approx(0.5, abs=0.07)
    # Negative control: other seeds give other crops.
    other = plan_batch(widths, heights, seeds + np.uint64(1), cfg, train=True, size=64)
    assert (other.crops.left != plan.crops.left).mean() > 0.9
