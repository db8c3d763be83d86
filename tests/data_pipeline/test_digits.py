"""The built-in digits set: real scans, ImageNet layout, a fixed split, rendered atomically."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

import data_pipeline.digits as digits
from data_pipeline.digits import MARKER, render_digits
from data_pipeline.prepare import read_index

CLASS_SIZES = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
"""Images per digit in scikit-learn's set (1,797 in all)."""


def files(root: Path, split: str) -> dict[str, list[str]]:
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted((root / split).iterdir())}


def test_ten_classes_and_the_right_counts(digits_root: Path) -> None:
    train, val = files(digits_root, "train"), files(digits_root, "val")
    assert list(train) == list(val) == [str(d) for d in range(10)]
    assert [len(val[str(d)]) for d in range(10)] == [n // 5 for n in CLASS_SIZES]
    assert [len(train[str(d)]) + len(val[str(d)]) for d in range(10)] == CLASS_SIZES
    assert sum(map(len, train.values())) == 1442 and sum(map(len, val.values())) == 355
    assert json.loads((digits_root / MARKER).read_text()) == {"classes": 10, "image_size": 32, "train": 1442,
                                                              "val": 355}


def test_train_and_val_are_disjoint(digits_root: Path) -> None:
    train = {f for names in files(digits_root, "train").values() for f in names}
    val = {f for names in files(digits_root, "val").values() for f in names}
    assert len(train) == 1442 and len(val) == 355 and not train & val


def test_images_are_rgb_jpegs_of_32_px(digits_root: Path) -> None:
    for path in list((digits_root / "val" / "7").iterdir())[:5]:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))
            # Dark ink on light paper: the border is light, some pixel is dark.
            gray = image.convert("L")
            assert gray.getpixel((0, 0)) > 200 and np.asarray(gray).min() < 100


def test_the_split_is_the_same_on_every_render(tmp_path: Path, digits_root: Path) -> None:
    again = render_digits(tmp_path / "again")
    for split in ("train", "val"):
        assert files(again, split) == files(digits_root, split)


def test_a_complete_render_is_left_as_it_is(tmp_path: Path) -> None:
    root = render_digits(tmp_path / "d")
    sentinel = root / "train" / "0" / "kept.txt"
    sentinel.write_text("x")
    assert render_digits(root) == root and sentinel.exists()


def test_an_interrupted_render_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    original = digits._to_image

    def failing(scan):  # noqa: ANN001, ANN202
        nonlocal calls
        calls += 1
        if calls == 500:
            raise KeyboardInterrupt
        return original(scan)

    monkeypatch.setattr(digits, "_to_image", failing)
    with pytest.raises(KeyboardInterrupt):
        render_digits(tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


def test_a_foreign_non_empty_folder_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"not empty and holds no complete digits render"):
        render_digits(tmp_path / "d")
    assert (tmp_path / "d" / "mine.txt").read_text() == "x"


def test_labels_match_torchvision_image_folder(digits_root: Path) -> None:
    ours = read_index(digits_root / "index", digits_root, "train")
    theirs = ImageFolder(str(digits_root / "train"))
    assert list(ours.classes) == theirs.classes
    assert [(str(ours.root / s.path), s.label) for s in ours.samples] == theirs.samples
    assert Counter(s.label for s in ours.samples) == Counter(theirs.targets)
    assert {(s.width, s.height) for s in ours.samples} == {(32, 32)}
