"""Streaming a packed data set (`shards`): shards fetched ahead of need into a bounded node-local cache.

`ShardCache` keeps a node's copies of a packed data set's shards in one folder, shared by the node's ranks:
- a shard is downloaded by one process at a time (a lock per shard), streamed into a temporary file, checked
  against the manifest's size and SHA-256 and only then renamed into place, so nothing half-written or
  corrupt is ever read; a failed transfer (connection reset, server gone) is retried with back-off;
- beside each shard a marker records the size and modification time it was checked at; a shard whose file
  changed since is hashed again before use (and fetched again if it no longer matches);
- with a size limit, the least recently used shards are deleted to make room (under a lock for the node).
  A reader that has a shard open keeps reading it after it is deleted (POSIX), and a shard deleted before it
  was opened is fetched again; shards being fetched at once can exceed the limit by their own size.

`ShardSource` reads one split's samples by byte range: from local shards in place, or through the cache,
fetching the shards of the next `ahead` shards of the epoch's order on background threads.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.index import DatasetError, SplitIndex
from data_pipeline.shards import Shard, train_order
from data_pipeline.storage import open_storage

FETCH_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Waits before the 2nd, 3rd, ... try of a shard download; then the run ends with the error."""
CHUNK_BYTES = 8 << 20
PARTIAL = ".partial"
MARKER = ".ok"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


class ShardCache:
    """This node's copies of the shards of the packed data set at `url`, in `folder`, at most `limit_bytes` of
    them (None: no limit)."""

    def __init__(self, url: str, folder: Path, *, limit_bytes: int | None,
                 log: Callable[[str], None] = print) -> None:
        self.url = url.rstrip("/")
        self.folder = folder
        self.limit_bytes = limit_bytes
        self.log = log
        self.fetched_bytes = 0
        """Bytes this process downloaded (tries that failed included)."""
        self.fetched_shards = 0
        self.evicted_shards = 0
        self.failed_fetches = 0
        self.rehashed_shards = 0
        """Cached shards hashed again because their file changed after its check."""
        self._counts = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in (folder / PARTIAL).glob("*"):  # what fetches of processes that died were writing
            if not _alive(int(leftover.name)) or int(leftover.name) == os.getpid():
                shutil.rmtree(leftover, ignore_errors=True)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_counts"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _counts=threading.Lock())

    def path(self, shard: Shard) -> Path:
        """The local file of `shard`, checked against the manifest; fetched first if it is not here."""
        local = self.folder / shard.name
        if self._checked(shard, local):
            try:
                os.utime(self._marker(local))  # last use, for the eviction order
                return local
            except FileNotFoundError:  # evicted this moment: fetched again below
                pass
        with _locked(self.folder / f"{shard.name}.lock"):
            if self._checked(shard, local):
                return local
            if local.exists():  # changed since its check: hash it again
                with self._counts:
                    self.rehashed_shards += 1
                if _sha256(local) == shard.sha256:
                    self._mark(shard, local)
                    return local
                self.log(f"{local}: does not match the SHA-256 of {self.url}/{shard.name} in the manifest; "
                         "fetching it again")
                local.unlink()
            self._make_room(shard)
            self._fetch(shard, local)
            return local

    def _marker(self, local: Path) -> Path:
        return local.with_name(local.name + MARKER)

    def _checked(self, shard: Shard, local: Path) -> bool:
        try:
            stat = local.stat()
            marker = json.loads(self._marker(local).read_text())
        except (FileNotFoundError, ValueError):
            return False
        return marker == {"sha256": shard.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                          "inode": stat.st_ino}

    def _mark(self, shard: Shard, local: Path) -> None:
        stat = local.stat()
        self._marker(local).write_text(json.dumps({"sha256": shard.sha256, "size": stat.st_size,
                                                   "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}))

    def _make_room(self, shard: Shard) -> None:
        if self.limit_bytes is None:
            return
        if shard.num_bytes > self.limit_bytes:
            raise DatasetError(f"data.cache_limit_gb={self.limit_bytes / 1e9:g} is smaller than shard "
                               f"{self.url}/{shard.name} ({shard.num_bytes / 1e9:.3f} GB)")
        with _locked(self.folder / ".lock"):
            cached = []
            for marker in self.folder.glob(f"*{MARKER}"):
                local = marker.with_name(marker.name[:-len(MARKER)])
                try:
                    cached.append((marker.stat().st_mtime, local.stat().st_size, local, marker))
                except FileNotFoundError:
                    continue
            used = sum(size for _, size, _, _ in cached)
            for _, size, local, marker in sorted(cached, key=lambda entry: entry[0]):
                if used + shard.num_bytes <= self.limit_bytes:
                    break
                marker.unlink(missing_ok=True)
                local.unlink(missing_ok=True)
                used -= size
                with self._counts:
                    self.evicted_shards += 1

    def _fetch(self, shard: Shard, local: Path) -> None:
        storage = open_storage(self.url)
        partial = self.folder / PARTIAL / str(os.getpid())
        partial.mkdir(parents=True, exist_ok=True)
        for attempt, delay in enumerate((*FETCH_RETRY_DELAYS_S, None), start=1):
            temporary = partial / f"{shard.name}.{uuid.uuid4().hex}"
            try:
                digest = hashlib.sha256()
                size = 0
                with storage.open_read(shard.name) as source, open(temporary, "wb") as out:
                    while chunk := source.read(CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                with self._counts:
                    self.fetched_bytes += size
                if (size, digest.hexdigest()) != (shard.num_bytes, shard.sha256):
                    raise ValueError(f"got {size} bytes of SHA-256 {digest.hexdigest()[:12]}..., the manifest says "
                                     f"{shard.num_bytes} bytes of {shard.sha256[:12]}...")
                os.replace(temporary, local)
                self._mark(shard, local)
                with self._counts:
                    self.fetched_shards += 1
                return
            except FileNotFoundError:
                raise DatasetError(f"{self.url}/{shard.name} is in the manifest but not in the store: pack the "
                                   "data set again") from None
            except Exception as error:  # each file system raises its own types for a dropped transfer
                with self._counts:
                    self.failed_fetches += 1
                if delay is None:
                    raise DatasetError(f"cannot fetch {self.url}/{shard.name} ({attempt} tries): "
                                       f"{type(error).__name__}: {error}") from error
                self.log(f"fetching {self.url}/{shard.name} failed ({type(error).__name__}: {error}); "
                         f"trying again in {delay:g} s")
                time.sleep(delay)
            finally:
                temporary.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class ShardSource:
    """The encoded images of one packed split, read by byte range: from the shard files in place where
    `where` is the local folder of the data set (their sizes checked once), else through the cache `where`,
    fetching the shards of the next block of the order `schedule` set on `threads` background threads."""

    def __init__(self, index: SplitIndex, shards: tuple[Shard, ...], *, where: Path | ShardCache, threads: int,
                 block_shards: int) -> None:
        self.shards = shards
        self.order = train_order(shards, block_shards)
        """The training order of this split (`shards.train_order`)."""
        self.where = where
        """The local folder of the shards, or the cache that fetches them."""
        self.threads = threads
        self.ahead = block_shards
        """Shards fetched ahead of the last one read: the next block's."""
        count = len(index.samples)
        self.shard_of = np.full(count, -1, dtype=np.int64)
        self.offset_of = np.zeros(count, dtype=np.int64)
        for number, shard in enumerate(shards):
            self.shard_of[shard.samples] = number
            self.offset_of[shard.samples] = shard.offsets
        if (self.shard_of < 0).any():
            missing = index.samples[int(np.argmax(self.shard_of < 0))].path
            raise DatasetError(f"{missing} is in the index but in no shard: the index and the shards are from "
                               "different packs")
        self.size_of = np.asarray([sample.num_bytes for sample in index.samples], dtype=np.int64)
        if isinstance(where, Path):
            for shard in shards:
                if (size := (where / shard.name).stat().st_size) != shard.num_bytes:
                    raise DatasetError(f"{where / shard.name} has {size} bytes, the manifest says {shard.num_bytes}: "
                                       "it changed after packing; pack the data set again")
        self._init_fetching()

    def _init_fetching(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._fetches: dict[int, Future[Path]] = {}
        self._schedule: list[int] = []
        self._position: dict[int, int] = {}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers get the reading part, no threads
        state = self.__dict__.copy()
        for name in ("_lock", "_pool", "_fetches", "_schedule", "_position"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_fetching()

    def schedule(self, samples: Sequence[int]) -> None:
        """The samples the node reads next, in order (what is fetched ahead follows it)."""
        if isinstance(self.where, Path):
            return
        shards = dict.fromkeys(self.shard_of[np.asarray(samples, dtype=np.int64)].tolist())
        with self._lock:
            self._schedule = list(shards)
            self._position = {shard: position for position, shard in enumerate(self._schedule)}
            self._fetches = {shard: future for shard, future in self._fetches.items() if shard in self._position}

    def read_ahead(self, samples: Sequence[int]) -> None:
        """Start fetching the `ahead` shards that the schedule needs after those of `samples`."""
        self._fetch_after(set(self.shard_of[np.asarray(samples, dtype=np.int64)].tolist()))

    def _fetch_after(self, shards: set[int]) -> None:
        """Start fetching the `ahead` shards that the schedule needs after `shards`."""
        if isinstance(self.where, Path) or not self._schedule:
            return
        with self._lock:
            reached = max((self._position.get(shard, -1) for shard in shards), default=-1)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="shard-fetch")
            for shard in self._schedule[max(reached, 0):reached + 1 + self.ahead]:
                if shard not in self._fetches:
                    self._fetches[shard] = self._pool.submit(self.where.path, self.shards[shard])

    def _shard_path(self, shard: int) -> Path:
        if isinstance(self.where, Path):
            return self.where / self.shards[shard].name
        if (future := self._fetches.get(shard)) is not None:
            try:
                future.result()  # the fetch's error (DatasetError) if it failed for good
            except FileNotFoundError:  # evicted while it was being checked: path() fetches it again
                pass
        return self.where.path(self.shards[shard])  # the cheap check again: it may have been evicted since

    def read_batch(self, samples: Sequence[int]) -> list[np.ndarray]:
        """The encoded files of `samples`, as uint8 arrays."""
        numbers = np.asarray(samples, dtype=np.int64)
        out: list[np.ndarray] = [np.empty(0, np.uint8)] * len(numbers)
        shard_numbers = self.shard_of[numbers]
        self._fetch_after(set(shard_numbers.tolist()))
        for shard in dict.fromkeys(shard_numbers.tolist()):
            positions = np.flatnonzero(shard_numbers == shard)
            for attempt in range(3):
                try:
                    with open(self._shard_path(shard), "rb") as file:
                        for position in positions.tolist():
                            sample = numbers[position]
                            out[position] = np.frombuffer(os.pread(file.fileno(), int(self.size_of[sample]),
                                                                   int(self.offset_of[sample])), dtype=np.uint8)
                    break
                except FileNotFoundError:  # evicted between its check and the open: fetched again
                    if attempt == 2:
                        raise
        return out

    def read(self, sample: int) -> bytes:
        """The encoded file of one sample."""
        return self.read_batch([sample])[0].tobytes()
