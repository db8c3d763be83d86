"""`python -m launch data ...`: data set preparation commands."""

from __future__ import annotations

import json

from data_pipeline.digits import MARKER, render_digits


def render_digits_command(out: str) -> None:
    """Render the digits set into `out` and print its counts."""
    root = render_digits(out)
    counts = json.loads((root / MARKER).read_text())
    print(f"digits: {counts['classes']} classes, {counts['train']} train and {counts['val']} val images in {root}")
