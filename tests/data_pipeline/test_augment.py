"""Automatic augmentation and random erasing draws: functions of the sample's seed alone, covering their whole
space, with torchvision's magnitude ranges."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from torchvision.transforms import v2

from configs.schema import DataConfig
from data_pipeline.augment import (AUTO_AUGMENT_OPS, ERASE_AREAS, MAGNITUDE_RANGES, NUM_MAGNITUDE_BINS, AugmentOp,
                                   auto_augment_for, erase_box_for)

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
