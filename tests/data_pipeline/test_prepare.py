"""`data prepare`: every file is decoded once; quirky but valid images are kept, broken files and clutter are
left out with a reason, and training reads only the index."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from configs.schema import DataConfig
from data_pipeline import DatasetError, build_loaders
from data_pipeline.prepare import prepare_index
from launch.cli import main


def jpeg_bytes(mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=128 if mode == "L" else (10, 200, 30, 0)[: len(mode)]).save(buffer, "JPEG")
    return buffer.getvalue()


def quirky_tree(root: Path) -> None:
    """Two classes; train/a holds every quirk real ImageNet has, and the broken files it also has."""
    png = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(png, "PNG")
    gif = io.BytesIO()
    Image.new("RGB", (20, 20), (4, 5, 6)).save(gif, "GIF")  # PIL decodes it; a DALI pipeline stops on it
    files = {
        "train/a/gif_inside.JPEG": gif.getvalue(),
        "train/a/rgb.JPEG": jpeg_bytes(),
        "train/a/cmyk.JPEG": jpeg_bytes("CMYK"),
        "train/a/gray.JPEG": jpeg_bytes("L"),
        "train/a/png_inside.JPEG": png.getvalue(),
        "train/a/tiny.JPEG": jpeg_bytes(size=(1, 1)),
        "train/a/panorama.JPEG": jpeg_bytes(size=(600, 3)),
        "train/a/truncated.JPEG": jpeg_bytes(size=(200, 200))[:300],
        "train/a/empty.JPEG": b"",
        "train/a/notes.JPEG": b"this is not an image\n",
        "train/a/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "train/b/rgb.JPEG": jpeg_bytes(),
        "val/a/rgb.JPEG": jpeg_bytes(),
        "val/b/rgb.JPEG": jpeg_bytes(),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def test_quirky_images_are_kept_and_broken_files_are_reported(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    quirky_tree(tmp_path)
    assert main(["data", "prepare", str(tmp_path), "--num-workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "train: 7 images in 2 classes, 5 files left out" in out and "val: 2 images in 2 classes" in out
    index = tmp_path / "index"
    assert (index / "classes.txt").read_text() == "a\nb\n"
    lines = [line.split(" ") for line in (index / "train.txt").read_text().splitlines()]
    assert [(path, label, width, height) for path, label, width, height, _ in lines] == [
        ("a/cmyk.JPEG", "0", "40", "30"), ("a/gray.JPEG", "0", "40", "30"), ("a/panorama.JPEG", "0", "600", "3"),
        ("a/png_inside.JPEG", "0", "20", "20"), ("a/rgb.JPEG", "0", "40", "30"), ("a/tiny.JPEG", "0", "1", "1"),
        ("b/rgb.JPEG", "1", "40", "30")]
    assert all(int(num_bytes) == (tmp_path / "train" / path).stat().st_size for path, *_, num_bytes in lines)
    reasons = dict(line.split("\t") for line in (index / "excluded.txt").read_text().splitlines())
    assert set(reasons) == {"train/a/.DS_Store", "train/a/empty.JPEG", "train/a/notes.JPEG",
                            "train/a/truncated.JPEG", "train/a/gif_inside.JPEG"}
    assert reasons["train/a/gif_inside.JPEG"].startswith("GIF image: DALI's decoders do not read it")
    assert reasons["train/a/empty.JPEG"] == "empty file"
    assert reasons["train/a/truncated.JPEG"].startswith("not a decodable image: OSError")

    # Training reads the index only: every image it names decodes, in every mode, to a 3-channel tensor,
    # with either loader.
    for loader in ("torch", "dali"):
        cfg = DataConfig(dataset="folder", root=str(tmp_path), batch_size=7, dali_threads=1, loader_workers=1,
                         image_size=16, loader=loader)
        loaders = build_loaders(cfg, seed=0)
        images, labels = next(loaders.train.iter_epoch(0))
        assert images.shape == (7, 3, 16, 16) and sorted(labels.tolist()) == [0] * 6 + [1]
        assert torch.isfinite(images).all()


def test_missing_root_split_and_foreign_val_class_are_clear_errors(tmp_path: Path, digits_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"data set root not found: {tmp_path / 'nowhere'}"):
        prepare_index(tmp_path / "nowhere")
    shutil.copytree(digits_root / "train", tmp_path / "d" / "train")
    with pytest.raises(FileNotFoundError, match=rf"data set split not found: {tmp_path / 'd' / 'val'}"):
        prepare_index(tmp_path / "d")
    shutil.copytree(digits_root / "val", tmp_path / "d" / "val")
    shutil.copytree(tmp_path / "d" / "val" / "3", tmp_path / "d" / "val" / "n99999999")
    with pytest.raises(DatasetError, match=r"class folders \['n99999999'\] have no training folder"):
        prepare_index(tmp_path / "d")


def test_a_split_without_a_decodable_image_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / ".DS_Store").write_text("")
    assert main(["data", "prepare", str(tmp_path)]) == 2
    assert f"{tmp_path / 'train'}: no decodable images" in capsys.readouterr().err
