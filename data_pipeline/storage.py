"""Where bytes are kept: storage behind URLs (local paths, `file://`, `memory://` for tests, object stores,
through fsspec) for data sets and checkpoints, and the one recipe for writing a local file atomically.

The one module that imports fsspec. `s3://` and `gs://` need their fsspec packages (s3fs, gcsfs).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Protocol

TEMPORARY_MARK = ".tmp-"
"""In the name of a file that `atomic_write` has not finished: never a complete file."""


def atomic_write(path: str | Path, data: bytes | str, *, temporary_dir: str | Path | None = None,
                 fsync: bool = False) -> None:
    """Write `path` so that readers see either its old content or all of `data`, never a part: write a
    temporary file beside it (or in `temporary_dir`, on the same file system) and rename it over `path`.
    `fsync`: also flush the data to the disk before the rename, so that a machine crash cannot leave an
    empty file behind the new name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(temporary_dir) if temporary_dir is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f"{path.name}{TEMPORARY_MARK}{uuid.uuid4().hex}"
    try:
        with open(temporary, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class Storage(Protocol):
    """A folder of files addressed by '/'-separated paths relative to its root."""

    url: str
    """Where the root lives, as given."""

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file; readers see either nothing or all of `data`."""
        ...

    def read_bytes(self, path: str) -> bytes:
        """Read a whole file."""
        ...

    def open_read(self, path: str) -> BinaryIO:
        """A stream of a file's bytes from its start (object stores send it a range at a time)."""
        ...

    def size(self, path: str) -> int | None:
        """Size of a file in bytes, or None if it does not exist."""
        ...

    def list(self, path: str = "") -> list[str]:
        """Names of the entries directly under `path` (empty if it does not exist)."""
        ...

    def remove(self, path: str) -> None:
        """Delete a file or a folder with everything under it; nothing happens if it is absent."""
        ...

    def move(self, path: str, new_path: str) -> None:
        """Move a file or a folder with everything under it (a copy and a delete on object stores)."""
        ...


class FsspecStorage:
    """`Storage` over any fsspec file system."""

    def __init__(self, url: str) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def _full(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def write_bytes(self, path: str, data: bytes) -> None:
        """Local files: write a temporary file beside the target and rename it (atomic on one file system;
        fsspec's own local transactions put the temporary in /tmp, which may be another disk). Object
        stores: one PUT, which is atomic per object."""
        full = self._full(path)
        self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
        if self.is_local:
            atomic_write(full, data, fsync=True)
        else:
            self.fs.pipe_file(full, data)

    def read_bytes(self, path: str) -> bytes:
        return bytes(self.fs.cat_file(self._full(path)))

    def open_read(self, path: str) -> BinaryIO:
        return self.fs.open(self._full(path), "rb")  # type: ignore[no-any-return]

    def size(self, path: str) -> int | None:
        full = self._full(path)
        self.fs.invalidate_cache(full)  # as in list(): another process may have written it since
        try:
            return int(self.fs.size(full))
        except FileNotFoundError:
            return None

    def list(self, path: str = "") -> list[str]:
        full = self._full(path)
        # Listings are read fresh: s3fs caches them per process, and other processes write (leases, commits).
        self.fs.invalidate_cache(full)
        try:
            entries = self.fs.ls(full, detail=False)
        except FileNotFoundError:  # also when, on an object store, its last object went since a check
            return []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)

    def remove(self, path: str) -> None:
        try:
            self.fs.rm(self._full(path), recursive=True)
        except FileNotFoundError:  # absent, or gone since (another writer removed it)
            pass

    def move(self, path: str, new_path: str) -> None:
        source, target = self._full(path), self._full(new_path)
        if self.is_local:
            self.fs.mv(source, target, recursive=True)
            return
        # Object stores have no folders and no rename: copy each object under the prefix, then delete them
        # (s3fs's own recursive mv tries to copy the "folder" key itself, which does not exist).
        self.fs.invalidate_cache(source)
        files = self.fs.find(source)
        for file in files:
            self.fs.copy(file, target + file[len(source):])
        self.fs.rm(files)


def is_remote(url: str) -> bool:
    """Whether `url` names anything but the local file system (a plain path or file:// is local)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    return not isinstance(fsspec.core.url_to_fs(url)[0], LocalFileSystem)


def open_storage(url: str) -> Storage:
    """The storage for `url`: a path, `file://...`, `memory://...`, `s3://...`, `gs://...`."""
    return FsspecStorage(url)
