"""One split of a data set as a list of (relative path, label) pairs (read from the index; see `prepare`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from configs.errors import UserError


class DatasetError(UserError, ValueError):
    """A data set that cannot be trained on as it is; the message names the folder or file."""


class Sample(NamedTuple):
    """One indexed image, as `data prepare` found it."""

    path: str
    """Path relative to the split folder: <class>/<file>."""
    label: int
    """Class id: the class folder's position in the sorted class list."""
    width: int
    """Width in pixels, as stored (EXIF orientation is not applied, as in torchvision's loaders)."""
    height: int
    """Height in pixels, as stored."""
    num_bytes: int
    """File size, which a staged copy must match."""


@dataclass(frozen=True, slots=True)
class SplitIndex:
    """The images of one split and the class names that their labels index."""

    root: Path
    """The split's folder; sample paths are relative to it."""
    classes: tuple[str, ...]
    """Class folder names, sorted: label i is classes[i], as torchvision's ImageFolder numbers them."""
    samples: tuple[Sample, ...]
    """The images, sorted by path."""
