"""`python -m launch data ...`: data set preparation commands."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

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
        classes = len({sample.label for sample in prepared.kept})
        print(f"{split}: {len(prepared.kept)} images in {classes} classes, {len(prepared.excluded)} files left out")
    print(f"index written to {folder}; files left out and why: {folder / 'excluded.txt'}")


def bench_data_command(*, root: str | None, num_images: int, batch_size: int, num_workers: int, image_size: int,
                       rounds: int, as_json: bool) -> str:
    """Run `bench data` on `root` (or on `num_images` generated JPEGs in a temporary folder) and return
    its report."""
    import torch

    from configs.loader import ConfigError
    from configs.schema import DataConfig
    from launch.bench import bench_data, write_photo_like_jpegs

    if min(num_images, batch_size, num_workers, rounds) < 1:
        raise ConfigError(f"--images={num_images}, --batch-size={batch_size}, --num-workers={num_workers} and "
                          f"--rounds={rounds} must all be >= 1")
    variants = ["torch", "dali-cpu", *(["dali-mixed"] if torch.cuda.is_available() else [])]
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        if root is None:
            root = scratch
            write_photo_like_jpegs(Path(root), num_images=num_images)
            prepare_index(root, num_workers=num_workers)
            source = f"generated 500x375 q90, {sum(p.stat().st_size for p in Path(root).rglob('*.JPEG')) / 1e6:.0f} MB"
        else:
            source = root
        cfg = DataConfig(dataset="folder", root=root, batch_size=batch_size, num_workers=num_workers,
                         image_size=image_size)
        result = bench_data(cfg, rounds=rounds, variants=variants, source=source)
    return result.as_json() if as_json else result.table()
