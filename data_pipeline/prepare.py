"""`python -m launch data prepare ROOT`: decode every file of an ImageNet-layout tree once and write the index
that training reads, so that a bad file can never abort a run mid-epoch.

The index lives in `ROOT/index/` (or another folder): `classes.txt` (one class folder name per line, sorted:
line i is label i, as torchvision's ImageFolder numbers them), `train.txt` and `val.txt` (one
`<class>/<file> <label> <width> <height> <bytes>` per line, paths relative to the split folder: the size lets
the loaders draw crop windows without opening the file, the byte count lets staging check a copy),
`excluded.txt` (`<split>/<class>/<file>\t<reason>` for every file left out) and `index.json` (format
version and counts). The files are written to temporaries and renamed, `index.json` last, whose presence
marks a complete index.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.index import DatasetError, Sample, SplitIndex
from data_pipeline.storage import atomic_write

SPLITS = ("train", "val")
INDEX_FOLDER = "index"
CLASSES_FILE = "classes.txt"
EXCLUDED_FILE = "excluded.txt"
MARKER_FILE = "index.json"
FORMAT_VERSION = 2
"""Version 1 had no image sizes."""


@dataclass(frozen=True, slots=True)
class PreparedSplit:
    """What `prepare_index` found in one split."""

    kept: tuple[Sample, ...]
    """Every image that decoded, sorted by path."""
    excluded: tuple[tuple[str, str], ...]
    """(class/file, reason) of every file left out."""


LOADABLE_FORMATS = frozenset({"JPEG", "PNG", "TIFF", "BMP", "WEBP", "PPM", "JPEG2000"})
"""Image formats (PIL's names) that both loaders decode: DALI's decoders read these, PIL all of them. A
GIF, say, decodes in PIL but stops a DALI pipeline, so the index leaves it out."""


def check_image(path: str) -> tuple[int, int, int] | str:
    """(width, height, bytes) if `path` decodes completely as an image both loaders read (any mode: CMYK,
    grayscale, PNG under a .JPEG name, ...), else the reason it does not."""
    from PIL import Image

    try:
        num_bytes = os.path.getsize(path)
        if num_bytes == 0:
            return "empty file"
        with Image.open(path) as image:
            if image.format not in LOADABLE_FORMATS:
                return (f"{image.format} image: DALI's decoders do not read it (readable: "
                        f"{', '.join(sorted(LOADABLE_FORMATS))})")
            image.load()  # a full decode: a truncated file fails here, not at open
            if image.width < 1 or image.height < 1:
                return "image has no pixels"
            return image.width, image.height, num_bytes
    except Exception as error:  # PIL raises many types for undecodable data; the reason is what matters
        return f"not a decodable image: {type(error).__name__}: {error}"


def _class_files(split_folder: Path, classes: Iterable[str]) -> list[str]:
    return [f"{name}/{entry.name}" for name in classes
            for entry in sorted(os.scandir(split_folder / name), key=lambda e: e.name) if entry.is_file()]


def prepare_index(root: str | Path, *, out: str | Path | None = None, num_workers: int | None = None,
                  progress_every: int = 10_000) -> dict[str, PreparedSplit]:
    """Decode every file under `root/train` and `root/val` in `num_workers` processes (default: all cores),
    write the index to `out` (default `root/index`) and return what each split holds.

    Raises FileNotFoundError for a missing root or split, DatasetError for a split without a decodable
    image or a val class that train does not have.
    """
    root = Path(root)
    out = Path(out) if out is not None else root / INDEX_FOLDER
    if not root.is_dir():
        raise FileNotFoundError(f"data set root not found: {root} (expected train/<class>/<image> and val/...)")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise FileNotFoundError(f"data set split not found: {root / split} (expected {split}/<class>/<image>)")
    classes = sorted(entry.name for entry in os.scandir(root / "train") if entry.is_dir())
    val_classes = sorted(entry.name for entry in os.scandir(root / "val") if entry.is_dir())
    if missing := sorted(set(val_classes) - set(classes)):
        raise DatasetError(f"{root / 'val'}: class folders {missing[:5]} have no training folder under "
                           f"{root / 'train'}")
    label_of = {name: label for label, name in enumerate(classes)}
    splits: dict[str, PreparedSplit] = {}
    # spawn, not fork: the caller may hold torch's thread pools, which do not survive a fork.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=num_workers or os.cpu_count() or 1, mp_context=context) as pool:
        for split, split_classes in (("train", classes), ("val", val_classes)):
            files = _class_files(root / split, split_classes)
            start = time.perf_counter()
            kept: list[Sample] = []
            excluded: list[tuple[str, str]] = []
            paths = [str(root / split / file) for file in files]
            for done, (file, result) in enumerate(zip(files, pool.map(check_image, paths, chunksize=64),
                                                      strict=True), start=1):
                if not isinstance(result, str) and any(ch.isspace() for ch in file):
                    result = "path contains whitespace, which the index's line format cannot hold"
                if isinstance(result, str):
                    excluded.append((file, result))
                else:
                    width, height, num_bytes = result
                    kept.append(Sample(file, label_of[file.split("/", 1)[0]], width, height, num_bytes))
                if done % progress_every == 0:
                    rate = done / (time.perf_counter() - start)
                    print(f"{split}: checked {done}/{len(files)} files ({rate:.0f}/s, "
                          f"eta {(len(files) - done) / rate:.0f} s)", flush=True)
            if not kept:
                raise DatasetError(f"{root / split}: no decodable images (expected {split}/<class>/<image>)")
            splits[split] = PreparedSplit(kept=tuple(kept), excluded=tuple(excluded))
    _write_index(out, classes, splits)
    return splits


def _write_text(path: Path, lines: Iterable[str]) -> None:
    atomic_write(path, "".join(f"{line}\n" for line in lines))


def _write_index(out: Path, classes: list[str], splits: dict[str, PreparedSplit]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).unlink(missing_ok=True)  # the index is incomplete until the marker is back
    for split, prepared in splits.items():
        _write_text(out / f"{split}.txt", (" ".join(map(str, sample)) for sample in prepared.kept))
    _write_text(out / EXCLUDED_FILE, (f"{split}/{file}\t{reason}" for split, prepared in splits.items()
                                      for file, reason in prepared.excluded))
    _write_text(out / CLASSES_FILE, classes)
    counts = {split: len(prepared.kept) for split, prepared in splits.items()}
    _write_text(out / MARKER_FILE, [json.dumps({"format": FORMAT_VERSION, "classes": len(classes), **counts})])


def index_folder(root: str | Path, index_dir: str | None) -> Path:
    """Where the index of `root` lives: `index_dir` if given, else `root/index`."""
    return Path(index_dir) if index_dir is not None else Path(root) / INDEX_FOLDER


def index_is_current(folder: Path) -> bool:
    """Whether `folder` holds a complete index in this version's format."""
    try:
        return json.loads((folder / MARKER_FILE).read_text())["format"] == FORMAT_VERSION
    except (FileNotFoundError, ValueError, KeyError):
        return False


def read_index(folder: Path, root: Path, split: str) -> SplitIndex:
    """The `split` written by `prepare_index` into `folder`, with sample paths relative to `root/split`."""
    if not index_is_current(folder):
        state = "is from an older version" if (folder / MARKER_FILE).is_file() else f"has no {MARKER_FILE}"
        raise DatasetError(f"no complete index at {folder} (it {state}): run "
                           f"`python -m launch data prepare {root}` first (training reads only indexed images)")
    classes = tuple((folder / CLASSES_FILE).read_text().splitlines())
    samples = []
    for line in (folder / f"{split}.txt").read_text().splitlines():
        path, label, width, height, num_bytes = line.split(" ")
        samples.append(Sample(path, int(label), int(width), int(height), int(num_bytes)))
    return SplitIndex(root=root / split, classes=classes, samples=tuple(samples))


def index_digest(folder: Path, split: str) -> str:
    """A fingerprint of what a split's index lists (classes, files, labels, sizes): 16 hex digits of the SHA-256
    of classes.txt and <split>.txt. Two evaluations with the same digest scored the same images."""
    digest = hashlib.sha256((folder / CLASSES_FILE).read_bytes())
    digest.update((folder / f"{split}.txt").read_bytes())
    return digest.hexdigest()[:16]
