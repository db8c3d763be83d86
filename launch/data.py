"""`python -m launch data ...`: data set preparation commands."""

from __future__ import annotations

import json

from data_pipeline.digits import MARKER, render_digits
from data_pipeline.prepare import index_folder, prepare_index


def render_digits_command(out: str) -> None:
    """Render the digits set into `out` and print its counts."""
    root = render_digits(out)
    counts = json.loads((root / MARKER).read_text())
    print(f"digits: {counts['classes']} classes, {counts['train']} train and {counts['val']} val images in {root}")


def prepare_command(root: str, *, out: str | None, num_workers: int | None) -> None:
    """Index `root` and print what each split holds."""
    splits = prepare_index(root, out=out, num_workers=num_workers)
    folder = index_folder(root, out)
    for split, prepared in splits.items():
        classes = len({label for _, label in prepared.kept})
        print(f"{split}: {len(prepared.kept)} images in {classes} classes, {len(prepared.excluded)} files left out")
    print(f"index written to {folder}; files left out and why: {folder / 'excluded.txt'}")
