"""Packed data sets: tar shards written by `data pack`, read in place from local disk and streamed from a real S3
server through a bounded node-local cache; the order is (seed, epoch)'s whatever the world size, batches resume
at any step, and dropped connections, corrupt cached shards and a cache smaller than an epoch are survived."""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import s3fs

from configs.schema import DataConfig
from data_pipeline import DatasetError, build_loaders, open_packed
from data_pipeline.shard_cache import PARTIAL, ShardCache
from data_pipeline.shards import MANIFEST, pack_dataset, read_manifest, train_order
from data_pipeline.sharding import ShardedBatchSampler
from data_pipeline.staging import stage_dataset
from launch.cli import main
from tests.data_pipeline.test_prepare import quirky_tree
from tests.serving import ResettingProxy

SHARD_MB = 0.1
"""About 50 digits images per shard: 29 training shards."""


@pytest.fixture(scope="module")
def packed(module_tmp: Path, digits_root: Path) -> Path:
    pack_dataset(digits_root, str(module_tmp / "packed"), shard_mb=SHARD_MB, log=lambda line: None)
    return module_tmp / "packed"


def config(root: str | Path, **changes: object) -> DataConfig:
    return DataConfig(**{"root": str(root), "batch_size": 32, "image_size": 16, "dali_threads": 1,
                         "loader_workers": 0, "shuffle_block_shards": 2, **changes})  # type: ignore[arg-type]


def test_shards_are_tar_files_of_the_indexed_images_and_broken_files_stay_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quirky_tree(tmp_path / "tree")
    assert main(["data", "pack", str(tmp_path / "tree"), "--out", str(tmp_path / "packed"), "--shard-mb", "0.001"]) == 0
    assert "train: 7 images in" in capsys.readouterr().out  # indexed first: the 5 broken files are not packed
    manifest = read_manifest(str(tmp_path / "packed"))
    (train, val), (train_source, _) = open_packed(config(tmp_path / "packed"))
    assert sorted(np.concatenate([shard.samples for shard in manifest["train"]]).tolist()) == list(range(7))
    for shard in manifest["train"]:
        data = (tmp_path / "packed" / shard.name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.num_bytes, shard.sha256)
        with tarfile.open(tmp_path / "packed" / shard.name) as tar:  # any tar tool reads a shard
            assert tar.getnames() == [train.samples[number].path for number in shard.samples]
    for number, sample in enumerate(train.samples):
        assert train_source.read(number) == (tmp_path / "tree" / "train" / sample.path).read_bytes()
    assert not any("empty" in sample.path or "truncated" in sample.path for sample in train.samples)


def test_the_training_order_reads_a_block_of_shards_at_a_time_whatever_the_world_size(packed: Path) -> None:
    shards = read_manifest(str(packed))["train"]
    order = train_order(shards, block_shards=2)
    epoch = order(7, 1)
    assert sorted(epoch) == list(range(1442)) and epoch == order(7, 1) and epoch != order(7, 2)
    shard_of = {int(sample): number for number, shard in enumerate(shards) for sample in shard.samples}
    block = {shard_of[sample] for sample in epoch[:40]}
    assert len(block) == 2  # the first samples are two shards' mixed together, and the block is all of them
    in_block = set(np.concatenate([shards[number].samples for number in block]).tolist())
    assert set(epoch[:len(in_block)]) == in_block
    alone = ShardedBatchSampler(1442, batch_size=64, rank=0, world_size=1, seed=7, train=True, order=order)
    pair = [ShardedBatchSampler(1442, batch_size=32, rank=rank, world_size=2, seed=7, train=True, order=order)
            for rank in (0, 1)]
    for whole, *halves in zip(alone.batches(1), *(sampler.batches(1) for sampler in pair), strict=True):
        assert whole == [key for half in halves for key in half]


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_local_shards_give_the_folders_images_and_resume_at_any_batch(packed: Path, digits_root: Path,
                                                                       loader: str) -> None:
    from_shards = build_loaders(config(packed, loader=loader), seed=3)
    from_folder = build_loaders(config(digits_root, loader=loader), seed=3)
    for (a, labels_a), (b, labels_b) in zip(from_shards.val.iter_epoch(0), from_folder.val.iter_epoch(0), strict=True):
        assert torch_equal(a, b) and torch_equal(labels_a, labels_b)
    epoch = list(from_shards.train.iter_epoch(1))
    resumed = list(from_shards.train.iter_epoch(1, start_batch=30))
    assert len(resumed) == len(epoch) - 30 == 45 - 30
    assert all(torch_equal(x, y) and torch_equal(u, v) for (x, u), (y, v) in zip(epoch[30:], resumed, strict=True))


def torch_equal(a: object, b: object) -> bool:
    import torch

    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return torch.equal(a, b)


def cached_bytes(folder: Path) -> int:
    """What the cache holds now (the fetch threads may delete a shard while this looks)."""
    total = 0
    for path in folder.glob("*.tar"):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def test_streaming_from_s3_with_a_cache_of_half_the_set(packed: Path, s3_bucket: str, tmp_path: Path) -> None:
    s3fs.S3FileSystem().put(str(packed), f"{s3_bucket}/digits", recursive=True)
    train_bytes = sum(shard.num_bytes for shard in read_manifest(str(packed))["train"])
    limit_gb = train_bytes / 2 / 1e9
    streamed = build_loaders(config(f"{s3_bucket}/digits", stage_dir=str(tmp_path), cache_limit_gb=limit_gb), seed=3)
    local = build_loaders(config(packed), seed=3)
    cache = streamed.train.source.where  # type: ignore[attr-defined]
    assert isinstance(cache, ShardCache)
    largest = max(shard.num_bytes for shard in read_manifest(str(packed))["train"])
    for epoch in (0, 1):
        for (a, labels_a), (b, labels_b) in zip(streamed.train.iter_epoch(epoch), local.train.iter_epoch(epoch),
                                                strict=True):
            assert torch_equal(a, b) and torch_equal(labels_a, labels_b)
            # at most the limit, plus what the fetch threads had in flight
            assert cached_bytes(cache.folder) <= train_bytes / 2 + 4 * largest
    # Half the set fits: the oldest shards made room, and the second epoch fetched most of them again.
    assert cache.fetched_bytes > 1.5 * train_bytes and cache.evicted_shards > 0
    assert not list((cache.folder / PARTIAL).rglob("*.tar*"))


def test_dataloader_workers_stream_through_the_same_cache(packed: Path, s3_bucket: str, tmp_path: Path) -> None:
    s3fs.S3FileSystem().put(str(packed), f"{s3_bucket}/digits", recursive=True)
    streamed = build_loaders(config(f"{s3_bucket}/digits", stage_dir=str(tmp_path), loader="torch", loader_workers=1,
                                    cache_limit_gb=0.001), seed=3)
    local = build_loaders(config(packed, loader="torch"), seed=3)
    for (a, labels_a), (b, labels_b) in zip(streamed.train.iter_epoch(1, 35), local.train.iter_epoch(1, 35),
                                            strict=True):
        assert torch_equal(a, b) and torch_equal(labels_a, labels_b)


def test_a_dropped_connection_and_a_corrupt_cached_shard_are_fetched_again(packed: Path, s3_bucket: str,
                                                                           s3_endpoint: str, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    s3fs.S3FileSystem().put(str(packed), f"{s3_bucket}/digits", recursive=True)
    shard = read_manifest(str(packed))["train"][0]
    host, port = s3_endpoint.rsplit("/", 1)[-1].split(":")
    proxy = ResettingProxy((host, int(port)))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        logged: list[str] = []
        cache = ShardCache(f"{s3_bucket}/digits", tmp_path / "cache", limit_bytes=None, log=logged.append)
        # More cuts than s3fs retries a read (5): its error reaches the cache, which tries the shard again.
        proxy.arm(after_bytes=shard.num_bytes // 2, times=7)
        path = cache.path(shard)
        assert proxy.resets == 7 and cache.failed_fetches == 1  # the faults happened, and one reached the cache
        assert any("trying again in" in line for line in logged)
        assert path.read_bytes() == (packed / shard.name).read_bytes()
        assert not list((tmp_path / "cache" / PARTIAL).rglob("*.tar*"))  # nothing half-written was left

        # A cached shard changed on disk (bit rot, a partial copy): hashed again, found wrong, fetched again.
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        fetched = cache.fetched_shards
        assert cache.path(shard).read_bytes() == (packed / shard.name).read_bytes()
        assert (cache.rehashed_shards, cache.fetched_shards) == (1, fetched + 1)
        assert any("does not match the SHA-256" in line for line in logged)
        # Negative control: an unchanged cached shard is neither hashed nor fetched again.
        cache.path(shard)
        assert (cache.rehashed_shards, cache.fetched_shards) == (1, fetched + 1)
    finally:
        proxy.close()
        s3fs.S3FileSystem.clear_instance_cache()


def test_clear_errors_for_a_cache_below_one_shard_and_a_missing_shard(packed: Path, s3_bucket: str,
                                                                     tmp_path: Path) -> None:
    s3fs.S3FileSystem().put(str(packed), f"{s3_bucket}/digits", recursive=True)
    shards = read_manifest(str(packed))["train"]
    with pytest.raises(DatasetError, match=r"data.cache_limit_gb=1e-05 is smaller than shard .*train-00000.tar"):
        ShardCache(f"{s3_bucket}/digits", tmp_path, limit_bytes=10_000).path(shards[0])
    s3fs.S3FileSystem().rm(f"{s3_bucket}/digits/{shards[1].name}")
    with pytest.raises(DatasetError, match=r"train-00001.tar is in the manifest but not in the store"):
        ShardCache(f"{s3_bucket}/digits", tmp_path, limit_bytes=None).path(shards[1])
    assert json.loads((packed / MANIFEST).read_text())["format"] == 1


def test_packing_straight_to_s3_and_staging_from_s3(tmp_path: Path, s3_bucket: str) -> None:
    quirky_tree(tmp_path / "tree")
    pack_dataset(tmp_path / "tree", f"{s3_bucket}/packed", shard_mb=0.001, log=lambda line: None)
    (train, _), _ = open_packed(config(f"{s3_bucket}/packed", stage_dir=str(tmp_path / "stage")))
    assert len(train.samples) == 7
    # The indexed tree itself, staged file by file (the path of unpacked data sets at URLs).
    s3fs.S3FileSystem().put(str(tmp_path / "tree"), f"{s3_bucket}/tree", recursive=True)
    staged = stage_dataset(f"{s3_bucket}/tree", tmp_path / "stage", log=lambda line: None)
    assert staged.copied_files == 7 + 2
    cmyk = "train/a/cmyk.JPEG"
    assert (staged.root / cmyk).read_bytes() == (tmp_path / "tree" / cmyk).read_bytes()
