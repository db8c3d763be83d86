"""The built-in data set: scikit-learn's handwritten digits rendered as an ImageNet-layout JPEG tree.

1,797 real 8x8 scans (UCI "Optical Recognition of Handwritten Digits", bundled with scikit-learn, so
nothing is downloaded) in 10 classes. Each is upscaled to `IMAGE_SIZE` px, drawn dark on light in RGB
and written as `train/<digit>/digits_<index>.JPEG` or `val/<digit>/...` by a fixed seeded split.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
"""Side of the rendered images, in pixels (the small-input stem's range)."""
VAL_FRACTION_DENOMINATOR = 5
"""Every class gives len(class) // 5 of its images to val, the rest to train."""
SPLIT_SEED = 0
"""Seed of the train/val split; fixed so that every machine renders the same split."""
MARKER = "digits.json"
"""Written last: a folder without it is an unfinished render and is rebuilt."""


def render_digits(out: str | Path) -> Path:
    """Render the digits tree into `out` unless a complete render is already there; return `out`.

    The tree is built in a temporary sibling folder and moved into place in one rename, so an
    interrupted render never leaves a partial data set behind under `out`.
    """
    from sklearn.datasets import load_digits

    from data_pipeline.prepare import INDEX_FOLDER, index_is_current, prepare_index

    out = Path(out)
    if (out / MARKER).is_file():
        if not index_is_current(out / INDEX_FOLDER):  # rendered by a version with another index format
            prepare_index(out, num_workers=1)
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and holds no complete digits render ({MARKER} missing)")
    out.parent.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    counts = {"train": 0, "val": 0}
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for label in range(10):
            indices = rng.permutation(np.flatnonzero(digits.target == label))
            num_val = len(indices) // VAL_FRACTION_DENOMINATOR
            for split, chosen in (("val", indices[:num_val]), ("train", indices[num_val:])):
                folder = staging / split / str(label)
                folder.mkdir(parents=True)
                for index in chosen:
                    _to_image(digits.images[index]).save(folder / f"digits_{index:04d}.JPEG", quality=95)
                counts[split] += len(chosen)
        prepare_index(staging, num_workers=1)
        (staging / MARKER).write_text(json.dumps({"classes": 10, "image_size": IMAGE_SIZE, **counts}))
        if out.exists():
            out.rmdir()
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        # Another process (a second worker on this node) may have finished the same render first.
        if (out / MARKER).is_file():
            return out
        raise
    return out


def _to_image(scan: np.ndarray) -> Image.Image:
    """An 8x8 scan with ink values 0..16 as a dark-on-light RGB image of IMAGE_SIZE px."""
    gray = (255 - scan * (255 / 16)).round().astype(np.uint8)
    return Image.fromarray(gray).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC).convert("RGB")

