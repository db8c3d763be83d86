"""One split of a data set as a list of (relative path, label) pairs (read from the index; see `prepare`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """A data set that cannot be trained on as it is; the message names the folder or file."""


@dataclass(frozen=True, slots=True)
class SplitIndex:
    """The images of one split and the class names that their labels index."""

    root: Path
    """The split's folder; sample paths are relative to it."""
    classes: tuple[str, ...]
    """Class folder names, sorted: label i is classes[i], as torchvision's ImageFolder numbers them."""
    samples: tuple[tuple[str, int], ...]
    """(path relative to root, label), sorted by path."""
