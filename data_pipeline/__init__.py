"""Data loading: `build_loaders(cfg.data, ...)` turns a data config into train and val loaders."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from configs.schema import DataConfig
from data_pipeline.storage import is_remote
from data_pipeline.index import DatasetError, SplitIndex
from data_pipeline.prepare import INDEX_FOLDER, index_folder, read_index
from data_pipeline.shards import is_packed

if TYPE_CHECKING:
    from data_pipeline.shard_cache import ShardSource


__all__ = ["DatasetError", "Loader", "Loaders", "build_loaders", "prepare_dataset"]


class Loader(Protocol):
    """One rank's batches of (images, int64 labels), addressable by epoch and batch. Images are NCHW
    channels-last tensors (NHWC in memory) of the loader's input dtype."""

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        ...

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of epoch `epoch` from batch `start_batch` on; the same for the same arguments."""
        ...


@dataclass(frozen=True, slots=True)
class Loaders:
    """What the trainer needs from the data side."""

    train: Loader
    """Training batches, shuffled per epoch, full batches only."""
    val: Loader
    """This rank's share of the validation images, each image on exactly one rank, once."""
    classes: tuple[str, ...]
    """Class names; label i is classes[i]."""
    num_train_images: int
    """Images in the training split."""
    num_val_images: int
    """Images in the validation split."""


def prepare_dataset(cfg: DataConfig) -> tuple[Path, str | None]:
    """The data set's local root folder and index folder (None: root/index): the built-in digits set is
    rendered there first, a data set at a URL is staged to `cfg.stage_dir` first."""
    if cfg.dataset == "digits":
        from data_pipeline.digits import render_digits

        return render_digits(cfg.root), cfg.index_dir
    if is_remote(cfg.root) or (cfg.index_dir is not None and is_remote(cfg.index_dir)):
        from data_pipeline.staging import stage_dataset

        return stage_dataset(cfg.root, cfg.stage_dir, index_url=cfg.index_dir).root, None
    return Path(cfg.root), cfg.index_dir


def packed_local_folder(cfg: DataConfig) -> Path:
    """The local folder of the packed data set at `cfg.root`, with its index in `index/`: the data set itself on
    local disk; from a URL, this node's folder under `cfg.stage_dir`, the index copied into it."""
    if not is_remote(cfg.root):
        return Path(cfg.root)
    from data_pipeline.staging import copy_index, staged_folder

    local = staged_folder(cfg.root, cfg.stage_dir)
    copy_index(f"{cfg.root.rstrip('/')}/{INDEX_FOLDER}", local)
    return local


def open_packed(cfg: DataConfig) -> tuple[tuple[SplitIndex, SplitIndex], tuple[ShardSource, ShardSource]]:
    """The train and val indexes and shard sources of the packed data set at `cfg.root`: read in place from
    local disk, streamed through the node's shard cache (`<stage_dir>/<name>/shards`) from a URL."""
    from data_pipeline.shard_cache import ShardCache, ShardSource
    from data_pipeline.shards import read_manifest

    manifest = read_manifest(cfg.root)
    local = packed_local_folder(cfg)
    where: Path | ShardCache = local
    if is_remote(cfg.root):
        limit = None if cfg.cache_limit_gb is None else int(cfg.cache_limit_gb * 1e9)
        where = ShardCache(cfg.root, local / "shards", limit_bytes=limit)
    indexes = tuple(read_index(local / INDEX_FOLDER, local, split) for split in ("train", "val"))
    sources = tuple(ShardSource(index, manifest[split], where=where, threads=cfg.fetch_threads,
                                block_shards=cfg.shuffle_block_shards)
                    for index, split in zip(indexes, ("train", "val"), strict=True))
    return (indexes[0], indexes[1]), (sources[0], sources[1])


def build_loaders(cfg: DataConfig, *, seed: int, rank: int = 0, world_size: int = 1,
                  device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Loaders:
    """Index the train and val splits and build rank `rank`'s loaders over them, with images of `dtype`
    for `device`: DALI decodes on that GPU (or CPU threads); the baseline fills pinned host memory for a
    GPU; synthetic data is made there."""
    device = device or torch.device("cpu")
    if cfg.dataset == "synthetic":
        return build_synthetic_loaders(cfg, seed=seed + rank, world_size=world_size, device=device, dtype=dtype)
    sources: dict[str, ShardSource | None] = {"train": None, "val": None}
    if cfg.dataset == "folder" and is_packed(cfg.root):
        (train_index, val_index), (sources["train"], sources["val"]) = open_packed(cfg)
    else:
        root, index_dir = prepare_dataset(cfg)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={cfg.root!r}: no such folder (expected train/ and val/ under it)")
        # Only indexed images are read: every one of them decoded when `data prepare` wrote the index.
        folder = index_folder(root, index_dir)
        train_index = read_index(folder, root, "train")
        val_index = read_index(folder, root, "val")
    if cfg.loader == "dali":
        from data_pipeline.dali import DaliLoader

        def build(index: SplitIndex, train: bool) -> Loader:
            return DaliLoader(index, cfg, train=train, seed=seed, rank=rank, world_size=world_size, device=device,
                              dtype=dtype, source=sources["train" if train else "val"])
    else:
        from data_pipeline.torch_loader import build_torch_loader

        def build(index: SplitIndex, train: bool) -> Loader:
            return build_torch_loader(index, cfg, train=train, seed=seed, rank=rank, world_size=world_size,
                                      pin_memory=device.type == "cuda", dtype=dtype,
                                      source=sources["train" if train else "val"])
    return Loaders(
        train=build(train_index, True),
        val=build(val_index, False),
        classes=train_index.classes,
        num_train_images=len(train_index.samples),
        num_val_images=len(val_index.samples),
    )


def build_synthetic_loaders(cfg: DataConfig, *, seed: int, world_size: int, device: torch.device,
                            dtype: torch.dtype) -> Loaders:
    """Loaders of `data_pipeline.synthetic`: full global batches of the configured image count."""
    from data_pipeline.synthetic import SyntheticLoader

    global_batch_size = cfg.batch_size * world_size
    return Loaders(
        train=SyntheticLoader(cfg, train=True, num_batches=cfg.synthetic_images // global_batch_size, seed=seed,
                              device=device, dtype=dtype),
        val=SyntheticLoader(cfg, train=False, num_batches=1, seed=seed, device=device, dtype=dtype),
        classes=tuple(f"class_{i}" for i in range(cfg.synthetic_classes)),
        num_train_images=cfg.synthetic_images,
        num_val_images=global_batch_size,
    )
