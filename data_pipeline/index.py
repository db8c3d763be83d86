"""An ImageNet-layout folder (`<split>/<class>/<image>`) as a list of (relative path, label) pairs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

class DatasetError(ValueError):
    """A data set that cannot be trained on as it is; the message names the folder or file."""


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File endings taken as images, compared case-insensitively (torchvision's ImageFolder list)."""


@dataclass(frozen=True, slots=True)
class SplitIndex:
    """The images of one split and the class names that their labels index."""

    root: Path
    """The split's folder; sample paths are relative to it."""
    classes: tuple[str, ...]
    """Class folder names, sorted: label i is classes[i], as torchvision's ImageFolder numbers them."""
    samples: tuple[tuple[str, int], ...]
    """(path relative to root, label), sorted by path."""


def scan_split(root: str | Path, split: str, classes: tuple[str, ...] | None = None) -> SplitIndex:
    """Index `root/split`. Pass the train split's `classes` when scanning val, so labels agree.

    Raises FileNotFoundError for a missing folder and DatasetError for a split with no images or with
    a class folder that `classes` does not know.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"data set split not found: {folder} (expected {split}/<class>/<image> under {root})")
    found = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if classes is None:
        classes = tuple(found)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetError(f"{folder}: class folders {unknown[:5]} are not in the training classes")
    label_of = {name: label for label, name in enumerate(classes)}
    samples = tuple(
        (f"{name}/{file}", label_of[name])
        for name in found
        for file in sorted(os.listdir(folder / name))
        if file.lower().endswith(IMAGE_SUFFIXES)
    )
    if not samples:
        raise DatasetError(f"{folder}: no images found (expected {split}/<class>/<image>)")
    return SplitIndex(root=folder, classes=classes, samples=samples)
