"""The served model's preprocessing is the run's evaluation transform: on non-square images of several sizes,
the pixels it feeds the network equal those the baseline loader's val split feeds it, exactly."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from configs import load_config
from data_pipeline import build_loaders
from data_pipeline.augment import val_crop
from data_pipeline.prepare import prepare_index, read_index
from launch.tracking.artifacts import Trained, export_trained
from launch.tracking.served_model import ImageClassifierModel
from trainer.models import build_model

SIZES = [(37, 23), (23, 37), (500, 375), (375, 500), (97, 64), (64, 64), (301, 200)]
"""width x height of the val images: landscape and portrait (a swapped width and height must show), odd sides."""


def noise_png(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)  # PNG: lossless, so both read the same pixels


def test_the_served_model_crops_and_resizes_as_the_evaluation_does(tmp_path: Path) -> None:
    root = tmp_path / "set"
    for i, (width, height) in enumerate(SIZES):
        noise_png(root / "val" / "a" / f"{i}.png", width, height, seed=i)
    for i in range(2):
        noise_png(root / "train" / "a" / f"{i}.png", 40, 30, seed=100 + i)
    prepare_index(root, num_workers=1)
    cfg = load_config("quickstart", [f"data.root={root}", "data.dataset=folder", "data.loader=torch",
                                     "data.loader_workers=0", "data.image_size=24", "data.val_crop_ratio=0.8",
                                     f"data.batch_size={len(SIZES)}", "model.num_classes=2"])
    loaders = build_loaders(cfg.data, seed=0, dtype=torch.float32)
    evaluated, _ = next(iter(loaders.val.iter_epoch(0)))  # normalised [N, 3, S, S], in index order

    written = export_trained(Trained(build_model(cfg.model).eval(), cfg, "untrained", {"classes": ["a", "b"]}),
                             tmp_path / "export")
    served = ImageClassifierModel()
    served.load_context(SimpleNamespace(artifacts={"program": str(written["program"]),
                                                   "metadata": str(written["metadata"])}))
    samples = read_index(root / "index", root, "val").samples
    assert len(samples) == len(SIZES) == len(evaluated)
    for sample, expected in zip(samples, evaluated, strict=True):
        pixels = served._prepare((root / "val" / sample.path).read_bytes())  # as a client sends a file
        as_input = (torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255 - served.mean) / served.std
        assert pixels.shape == (cfg.data.crop_size(train=False),) * 2 + (3,)
        assert torch.allclose(as_input[0], expected.float(), atol=1e-6, rtol=0), sample.path

    # Negative control: the same crop one pixel to the right gives other pixels, so the comparison above tells
    # crops apart by a pixel. (Width and height swapped would not even fit inside these non-square images.)
    width, height = SIZES[2]
    crop = val_crop(width, height, crop_ratio=0.8)
    with Image.open(root / "val" / "a" / "2.png") as image:
        shifted = np.asarray(image.convert("RGB").resize((24, 24), Image.Resampling.BILINEAR, box=(
            crop.left + 1, crop.top, crop.left + 1 + crop.width, crop.top + crop.height)))
    assert not np.array_equal(shifted, served._prepare((root / "val" / "a" / "2.png").read_bytes()))
