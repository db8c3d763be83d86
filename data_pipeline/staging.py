"""Copying a data set that lives at a URL (s3://, gs://, http(s)://) to fast local disk, once per node.

DALI and PIL read local files, and an epoch reads every image in random order, which object stores
serve slowly; so the images the index lists are copied to `<stage_dir>/<name>/` before training and read
from there. The index is the list: each file is fetched once, checked against the byte count `data
prepare` recorded and written under a temporary name then renamed, so a copy that was interrupted resumes
where it stopped and never leaves a half-written image under a real name. Every rank reads a different
part of each epoch's permutation (see `sharding`), so every node holds the whole set.

Processes on one node take a file lock: the first stages, the others wait and then find it complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.storage import atomic_write, open_storage
from data_pipeline.index import DatasetError, Sample
from data_pipeline.prepare import CLASSES_FILE, EXCLUDED_FILE, INDEX_FOLDER, MARKER_FILE, SPLITS, read_index

INDEX_FILES = (CLASSES_FILE, *(f"{split}.txt" for split in SPLITS), EXCLUDED_FILE, MARKER_FILE)
COMPLETE = ".staged.json"
"""Written last into a staged copy: its source and index fingerprint."""
PARTIAL = ".partial"
"""Where files are written before they are renamed into place; emptied when staging starts."""


@dataclass(frozen=True, slots=True)
class StagedDataset:
    """A local copy of a remote data set."""

    root: Path
    """Local folder with train/, val/ and index/, as `data prepare` laid them out."""
    copied_files: int
    """Images fetched by this call (0 when the copy was already complete)."""
    copied_bytes: int
    """Bytes fetched by this call."""


def staged_folder(url: str, stage_dir: str | Path) -> Path:
    """Where `url` is staged: a readable name plus a hash of the whole URL, under `stage_dir` (with `~` and
    this process's environment variables expanded; one that is not set is an error)."""
    expanded = os.path.expandvars(str(stage_dir))
    if unset := re.findall(r"\$\{?(\w+)", expanded):
        raise DatasetError(f"data.stage_dir={str(stage_dir)!r}: environment variable {unset[0]} is not set on "
                           f"this node ({socket.gethostname()})")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[-1]).strip("-")[-60:]
    return Path(expanded).expanduser() / f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def stage_dataset(url: str, stage_dir: str | Path, *, index_url: str | None = None, num_threads: int = 32,
                  report_every_s: float = 10.0, log: Callable[[str], None] = print) -> StagedDataset:
    """Copy the indexed images of the data set at `url` (and its index, from `index_url`, default
    `url/index`) to local disk under `stage_dir`, unless a complete copy of that index is there already.
    Fetches `num_threads` files at a time and logs progress every `report_every_s` seconds."""
    url = url.rstrip("/")
    index_url = (index_url or f"{url}/{INDEX_FOLDER}").rstrip("/")
    local = staged_folder(url, stage_dir)
    local.mkdir(parents=True, exist_ok=True)
    with open(local / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        index = _fetch_index(index_url)
        fingerprint = hashlib.sha256(b"".join(index.values())).hexdigest()
        try:
            done = json.loads((local / COMPLETE).read_text())
            if done == {"url": url, "index": fingerprint}:
                return StagedDataset(root=local, copied_files=0, copied_bytes=0)
        except (FileNotFoundError, ValueError):
            pass
        (local / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(local / PARTIAL, ignore_errors=True)  # what an interrupted copy was writing
        for name, data in index.items():
            atomic_write(local / INDEX_FOLDER / name, data, temporary_dir=local / PARTIAL)
        todo = [(split, sample) for split in SPLITS
                for sample in read_index(local / INDEX_FOLDER, local, split).samples
                if _size(local / split / sample.path) != sample.num_bytes]
        _copy(url, local, todo, num_threads=num_threads, report_every_s=report_every_s, log=log)
        atomic_write(local / COMPLETE, json.dumps({"url": url, "index": fingerprint}), temporary_dir=local / PARTIAL)
    return StagedDataset(root=local, copied_files=len(todo), copied_bytes=sum(s.num_bytes for _, s in todo))


def copy_index(index_url: str, local: Path) -> None:
    """Copy the index at `index_url` into `local/index` (each file atomically, so ranks may do it at once)."""
    for name, data in _fetch_index(index_url).items():
        atomic_write(local / INDEX_FOLDER / name, data)


def _fetch_index(index_url: str) -> dict[str, bytes]:
    storage = open_storage(index_url)
    files = {}
    for name in INDEX_FILES:
        try:
            files[name] = storage.read_bytes(name)
        except FileNotFoundError:
            if name != EXCLUDED_FILE:
                raise DatasetError(f"no index at {index_url} ({name} missing): run `python -m launch data prepare` "
                                   "on a local copy and upload its index/ folder beside train/ and val/") from None
        except Exception as error:  # each file system raises its own types for unreachable hosts
            raise DatasetError(f"cannot read {index_url}/{name}: {type(error).__name__}: {error}") from error
    return files


def _copy(url: str, local: Path, todo: list[tuple[str, Sample]], *, num_threads: int, report_every_s: float,
          log: Callable[[str], None]) -> None:
    if not todo:
        return
    storage = open_storage(url)
    total_bytes = sum(sample.num_bytes for _, sample in todo)
    log(f"staging {url} -> {local}: {len(todo)} files, {total_bytes / 1e9:.2f} GB to copy")

    def fetch(item: tuple[str, Sample]) -> int:
        split, sample = item
        source = f"{split}/{sample.path}"
        try:
            data = storage.read_bytes(source)
        except Exception as error:
            raise DatasetError(f"cannot read {url}/{source}: {type(error).__name__}: {error}") from error
        if len(data) != sample.num_bytes:
            raise DatasetError(f"{url}/{source} has {len(data)} bytes but the index says {sample.num_bytes}: "
                               "the data set changed after `data prepare`; run it again and upload the new index")
        atomic_write(local / source, data, temporary_dir=local / PARTIAL)
        return len(data)

    start = last_report = time.perf_counter()
    copied_bytes = 0
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for copied_files, num_bytes in enumerate(pool.map(fetch, todo), start=1):
            copied_bytes += num_bytes
            now = time.perf_counter()
            if now - last_report >= report_every_s or copied_files == len(todo):
                last_report = now
                rate = copied_bytes / max(now - start, 1e-9)
                log(f"staging: {copied_files}/{len(todo)} files, {copied_bytes / 1e9:.2f}/{total_bytes / 1e9:.2f} GB, "
                    f"{rate / 1e6:.1f} MB/s, eta {(total_bytes - copied_bytes) / rate:.0f} s")


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None

