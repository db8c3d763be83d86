"""Packed data sets: the indexed images of a data set in large tar shards, for streaming from object storage.

`python -m launch data pack ROOT --out URL` writes, under URL:
- `index/`: the index `data prepare` writes (classes, and per split each image's path, label, size, bytes);
- `<split>-NNNNN.tar`: the split's images as tar members named `<class>/<file>` (any tar tool lists them),
  about `shard_mb` each; the training split in one seeded random order, so that every shard holds a mix of
  classes, validation in index order;
- `shards.json`, written last (its presence marks a complete pack): per shard its name, size and SHA-256,
  and for each member its sample number in the split's index and the byte offset of its data, so that one
  image is read by byte range.

A training epoch reads the shards in a seeded order, a block of `block_shards` shards at a time, the samples
of each block shuffled together (`train_order`): a function of (seed, epoch) only, as for files, so that
batches do not depend on the world size and any step can be reproduced; and a node needs only the shards
of the current and the next block at a time (see `shard_cache`).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.index import DatasetError, SplitIndex
from data_pipeline.prepare import INDEX_FOLDER, SPLITS, index_folder, index_is_current, prepare_index, read_index
from data_pipeline.sharding import EpochOrder, epoch_seed
from data_pipeline.storage import Storage, open_storage

MANIFEST = "shards.json"
FORMAT_VERSION = 1
PACK_SEED = 0
"""Seed of the order the training split is packed in."""


@dataclass(frozen=True, slots=True)
class Shard:
    """One tar file of a packed split."""

    name: str
    """File name, relative to the packed data set's root."""
    num_bytes: int
    sha256: str
    samples: np.ndarray
    """Sample numbers (positions in the split's index) of the members, in file order."""
    offsets: np.ndarray
    """Byte offset of each member's data in the file."""


def read_manifest(url: str) -> dict[str, tuple[Shard, ...]]:
    """The shards of each split of the packed data set at `url`."""
    try:
        manifest = json.loads(open_storage(url).read_bytes(MANIFEST))
    except FileNotFoundError:
        raise DatasetError(f"no {MANIFEST} at {url}: not a packed data set (or its packing did not finish): run "
                           "`python -m launch data pack`") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise DatasetError(f"{url}/{MANIFEST} has format {manifest.get('format')}, this version reads "
                           f"{FORMAT_VERSION}: pack the data set again")
    return {split: tuple(Shard(s["name"], s["bytes"], s["sha256"], np.asarray(s["samples"], dtype=np.int64),
                               np.asarray(s["offsets"], dtype=np.int64)) for s in shards)
            for split, shards in manifest["splits"].items()}


def is_packed(url: str) -> bool:
    """Whether `url` holds a complete packed data set."""
    try:
        return open_storage(url).size(MANIFEST) is not None
    except Exception as error:  # each file system raises its own types for unreachable hosts
        raise DatasetError(f"cannot read {url}/{MANIFEST}: {type(error).__name__}: {error}") from error


def train_order(shards: tuple[Shard, ...], block_shards: int) -> EpochOrder:
    """The training order of a packed split: the shards in a seeded order, each block of `block_shards` of them
    shuffled together; a function of (seed, epoch) only."""
    return BlockShuffledOrder(tuple(shard.samples for shard in shards), block_shards)


@dataclass(frozen=True, slots=True)
class BlockShuffledOrder:
    """`train_order`'s order (a class, not a closure: DataLoader workers receive it pickled)."""

    members: tuple[np.ndarray, ...]
    """Each shard's sample numbers."""
    block_shards: int

    def __call__(self, seed: int, epoch: int) -> list[int]:
        generator = np.random.Generator(np.random.PCG64(epoch_seed(seed, epoch)))
        shard_order = generator.permutation(len(self.members))
        out = []
        for start in range(0, len(self.members), self.block_shards):
            block = np.concatenate([self.members[i] for i in shard_order[start:start + self.block_shards]])
            out.append(generator.permutation(block))
        return np.concatenate(out).tolist()


def pack_dataset(root: str | Path, out: str, *, index_dir: str | None = None, shard_mb: float = 256.0,
                 upload_threads: int = 4, log: Callable[[str], None] = print) -> dict[str, tuple[Shard, ...]]:
    """Pack the indexed images of the data set at `root` into shards of about `shard_mb` MB at `out` (a folder
    or URL), indexing it first if it has no current index. Returns the shards of each split."""
    root = Path(root)
    folder = index_folder(root, index_dir)
    if not index_is_current(folder):
        log(f"{folder}: no current index; indexing {root} first")
        prepare_index(root, out=folder)
    storage = open_storage(out)
    storage.remove(MANIFEST)  # the pack is incomplete until the manifest is back
    splits = {}
    with ThreadPoolExecutor(upload_threads) as pool:
        for split in SPLITS:
            index = read_index(folder, root, split)
            order = (np.random.Generator(np.random.PCG64(PACK_SEED)).permutation(len(index.samples))
                     if split == "train" else np.arange(len(index.samples)))
            splits[split] = _pack_split(index, order, split, storage, pool, shard_bytes=int(shard_mb * 1e6),
                                        max_pending=upload_threads, log=log)
    for name in sorted(path.name for path in folder.iterdir() if path.is_file()):
        storage.write_bytes(f"{INDEX_FOLDER}/{name}", (folder / name).read_bytes())
    manifest = {"format": FORMAT_VERSION, "pack_seed": PACK_SEED, "splits": {
        split: [{"name": s.name, "bytes": s.num_bytes, "sha256": s.sha256, "samples": s.samples.tolist(),
                 "offsets": s.offsets.tolist()} for s in shards] for split, shards in splits.items()}}
    storage.write_bytes(MANIFEST, json.dumps(manifest).encode())
    return splits


def _pack_split(index: SplitIndex, order: np.ndarray, split: str, storage: Storage, pool: ThreadPoolExecutor, *,
                shard_bytes: int, max_pending: int, log: Callable[[str], None]) -> tuple[Shard, ...]:
    shards: list[Shard] = []
    uploads: list[Future[None]] = []
    total = sum(sample.num_bytes for sample in index.samples)
    start = time.perf_counter()
    buffer, members, offsets = io.BytesIO(), list[int](), list[int]()
    tar = tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT)

    def finish() -> None:
        nonlocal buffer, tar, members, offsets
        tar.close()
        data = buffer.getvalue()
        name = f"{split}-{len(shards):05d}.tar"
        shards.append(Shard(name, len(data), hashlib.sha256(data).hexdigest(), np.asarray(members, dtype=np.int64),
                            np.asarray(offsets, dtype=np.int64)))
        uploads.append(pool.submit(storage.write_bytes, name, data))
        if len(uploads) > max_pending:  # bounds the shards held in memory
            uploads.pop(0).result()
        packed = sum(s.num_bytes for s in shards)
        rate = packed / max(time.perf_counter() - start, 1e-9)
        log(f"packing {split}: {len(shards)} shards, {packed / 1e9:.2f}/{total / 1e9:.2f} GB, {rate / 1e6:.0f} MB/s, "
            f"eta {max(total - packed, 0) / rate:.0f} s")
        buffer, members, offsets = io.BytesIO(), [], []
        tar = tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT)

    for number in order.tolist():
        sample = index.samples[number]
        path = index.root / sample.path
        data = path.read_bytes()
        if len(data) != sample.num_bytes:
            raise DatasetError(f"{path} has {len(data)} bytes but the index says {sample.num_bytes}: it changed after "
                               "`data prepare`; run it again")
        info = tarfile.TarInfo(sample.path)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        members.append(number)
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        offsets.append(tar.offset - padded)  # the member's data ends where the archive is now, padded to a block
        if buffer.tell() >= shard_bytes:
            finish()
    if members:
        finish()
    for upload in uploads:
        upload.result()
    return tuple(shards)
