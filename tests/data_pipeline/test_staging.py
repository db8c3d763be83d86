"""Data sets at URLs: staged from a real HTTP server (`python -m http.server`) to local disk once, resumed
after an interruption, checked against the index, and trained from."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from configs.schema import DataConfig
from data_pipeline import DatasetError, build_loaders
from data_pipeline.staging import PARTIAL, stage_dataset, staged_folder
from tests.multiproc import free_port
from tests.serving import http_server


@pytest.fixture(scope="module")
def served(module_tmp: Path, digits_root: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves): a copy of the digits set at <URL>/digits."""
    folder = module_tmp / "served"
    shutil.copytree(digits_root, folder / "digits")
    with http_server(folder) as base:
        yield base, folder


def test_a_data_set_at_a_url_is_staged_once_and_resumes_after_an_interruption(served: tuple[str, Path],
                                                                               tmp_path: Path) -> None:
    base, _ = served
    url = f"{base}/digits"
    logged: list[str] = []
    staged = stage_dataset(url, tmp_path, report_every_s=0.0, log=logged.append)
    assert staged.copied_files == 1442 + 355 and staged.root == staged_folder(url, tmp_path)
    assert logged[0].startswith(f"staging {url} -> {staged.root}: 1797 files")
    assert logged[-1].startswith("staging: 1797/1797 files") and "MB/s, eta 0 s" in logged[-1]
    assert stage_dataset(url, tmp_path, log=logged.append).copied_files == 0  # complete: nothing is fetched

    # An interrupted copy: files missing, one cut short by something other than us, a temporary left over.
    images = sorted((staged.root / "train").rglob("*.JPEG"))
    for path in images[:3]:
        path.unlink()
    images[3].write_bytes(images[3].read_bytes()[:100])
    (staged.root / ".staged.json").unlink()
    (staged.root / PARTIAL).mkdir(exist_ok=True)
    (staged.root / PARTIAL / "0a1b").write_bytes(b"half a file")
    resumed = stage_dataset(url, tmp_path, log=logged.append)
    assert resumed.copied_files == 4 and not (staged.root / PARTIAL / "0a1b").exists()
    source = Path(served[1]) / "digits" / "train"
    assert all(path.read_bytes() == (source / path.relative_to(staged.root / "train")).read_bytes()
               for path in images[:4])

    # Training reads the staged copy when data.root is the URL.
    cfg = DataConfig(dataset="folder", root=url, stage_dir=str(tmp_path), batch_size=64, dali_threads=1,
                     image_size=32, loader="dali")
    loaders = build_loaders(cfg, seed=0)
    assert (loaders.num_train_images, loaders.num_val_images) == (1442, 355)
    assert sum(labels.numel() for _, labels in loaders.val.iter_epoch(0)) == 355


def test_remote_problems_are_clear_errors_naming_the_url(served: tuple[str, Path], tmp_path: Path) -> None:
    base, folder = served
    with pytest.raises(DatasetError, match=rf"no index at {base}/nowhere/index \(classes.txt missing\)"):
        stage_dataset(f"{base}/nowhere", tmp_path, log=lambda _: None)
    closed = f"http://127.0.0.1:{free_port()}/digits"
    with pytest.raises(DatasetError, match=rf"cannot read {closed}/index/classes.txt"):
        stage_dataset(closed, tmp_path, log=lambda _: None)
    # A file that changed after `data prepare`: its size no longer matches the index.
    shutil.copytree(folder / "digits", folder / "changed")
    changed = next((folder / "changed" / "val" / "7").iterdir())
    changed.write_bytes(changed.read_bytes() + b"\0")
    with pytest.raises(DatasetError, match=rf"{base}/changed/val/7/{changed.name} has \d+ bytes but the index"):
        stage_dataset(f"{base}/changed", tmp_path, log=lambda _: None)


def test_the_stage_dir_expands_each_nodes_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NVME", str(tmp_path / "nvme"))
    assert staged_folder("http://host/digits", "$NODE_NVME/datasets").parent == tmp_path / "nvme" / "datasets"
    monkeypatch.delenv("NODE_NVME")
    with pytest.raises(DatasetError, match=r"data.stage_dir='\$\{NODE_NVME\}/datasets': environment variable "
                                           r"NODE_NVME is not set on this node"):
        staged_folder("http://host/digits", "${NODE_NVME}/datasets")
