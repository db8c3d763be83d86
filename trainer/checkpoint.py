"""Checkpoints that are either complete or invisible: one folder per step, data files first, manifest last.

Layout under the checkpoint URL: `step_000001234/<files>` and `step_000001234/manifest.json`. Each
writer (every rank) reports what it wrote: name, size and SHA-256 of each file. One process then writes
the manifest from all the reports, last, so a reader trusts a step only when the manifest exists, parses
and every file it lists is there at its size: a crash mid-write leaves the previous step as the latest,
and a stale listing of a shared file system cannot commit a step without another rank's file. Loading
checks each file's hash (`read_verified`). A committed step is never written again (object stores have no
atomic rename to protect it). Only the newest `keep_last` steps and the best one by validation top-1
are kept.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from configs.errors import UserError
from data_pipeline.storage import Storage, open_storage

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
"""2: files with size and SHA-256. Manifests of format 1 (sizes only) are still read; their files have no
hash to check."""
STEP_FOLDER = re.compile(r"^step_(?P<step>\d+)$")
"""The name of one step's folder; `step_folder` writes it."""


def step_folder(step: int) -> str:
    """The folder name of `step`, zero-padded so that names sort by step: `step_000001234`."""
    return f"step_{step:09d}"


def open_checkpoints(url: str, *, keep_last: int = 1) -> CheckpointManager:
    """The checkpoint manager of the checkpoints at `url` (a path or any URL `open_storage` takes).
    `keep_last` matters only to a writer; readers can leave it."""
    return CheckpointManager(open_storage(url), keep_last=keep_last)


class CheckpointCorrupt(UserError):
    """A committed step has a file that fails its check; the message names the file and the reason."""


class CheckpointUnreadable(OSError):
    """The storage kept failing to read a checkpoint file (an outage, not damage): nothing was moved."""


READ_RETRY_DELAYS_S = (1.0, 2.0, 4.0)
"""Pauses between the tries of a checkpoint read that fails with a storage error (OSError: a reset
connection, a timeout, a file system that went away); after the last, `CheckpointUnreadable`."""


def read_with_retries(read: Callable[[], bytes], what: str) -> bytes:
    """`read()`, tried again after each of `READ_RETRY_DELAYS_S` while it raises OSError; then
    `CheckpointUnreadable` naming `what` and the last error."""
    for delay in READ_RETRY_DELAYS_S:
        try:
            return read()
        except OSError as error:
            print(f"{what}: {type(error).__name__}: {error}; reading again in {delay:.0f} s", flush=True)
            time.sleep(delay)
    try:
        return read()
    except OSError as error:
        raise CheckpointUnreadable(
            f"{what}: the storage failed {len(READ_RETRY_DELAYS_S) + 1} reads in a row ({type(error).__name__}: "
            f"{error}); every checkpoint is where it was: run again once the storage answers") from error


@dataclass(frozen=True, slots=True)
class FileRecord:
    """What a writer reports of one file it wrote."""

    size: int
    """Bytes."""
    sha256: str | None
    """Hex digest (None in a manifest of format 1)."""

    @classmethod
    def of(cls, data: bytes) -> FileRecord:
        """The record of `data`."""
        return cls(size=len(data), sha256=hashlib.sha256(data).hexdigest())


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a committed checkpoint holds."""

    step: int
    """Optimiser steps taken when it was written."""
    files: dict[str, FileRecord]
    """File name -> its size and hash, for every data file of the step (from every writer)."""
    meta: dict[str, Any]
    """JSON facts written by the trainer (epoch, metrics, architecture, ...)."""


class CheckpointManager:
    """Saves and finds checkpoints in a `Storage`; see the module docstring for the guarantees."""

    def __init__(self, storage: Storage, *, keep_last: int) -> None:
        self.storage = storage
        self.keep_last = keep_last

    def url(self, step: int) -> str:
        """Where `step` lives."""
        return self._url(step_folder(step))

    def _url(self, path: str) -> str:
        return f"{self.storage.url.rstrip('/')}/{path}"

    def write(self, step: int, files: dict[str, bytes]) -> dict[str, FileRecord]:
        """Write data files of `step` (every rank writes its own) and return what was written, for `commit`;
        nothing is visible until then."""
        if self.manifest(step) is not None:
            raise FileExistsError(f"checkpoint {self.url(step)} is already committed; a step is never overwritten")
        for name, data in files.items():
            self.storage.write_bytes(f"{step_folder(step)}/{name}", data)
        return {name: FileRecord.of(data) for name, data in files.items()}

    def commit(self, step: int, meta: dict[str, Any], files: dict[str, FileRecord]) -> Manifest:
        """Make `step` visible: write its manifest from `files` (what every writer reported), then prune old
        steps. Call once, on one process, after every writer has finished."""
        manifest = Manifest(step=step, files=dict(sorted(files.items())), meta=meta)
        record = {"format": FORMAT_VERSION, "step": step, "meta": meta,
                  "files": {name: {"size": f.size, "sha256": f.sha256} for name, f in manifest.files.items()}}
        self.storage.write_bytes(f"{step_folder(step)}/{MANIFEST}", json.dumps(record, indent=1).encode())
        self.prune()
        return manifest

    def save(self, step: int, files: dict[str, bytes], meta: dict[str, Any]) -> Manifest:
        """`write` then `commit`, for a single writer."""
        return self.commit(step, meta, self.write(step, files))

    def manifest(self, step: int) -> Manifest | None:
        """The manifest of `step` if it is complete and every file it lists is there at its size, else None."""
        folder = step_folder(step)
        try:
            record = json.loads(self.storage.read_bytes(f"{folder}/{MANIFEST}"))
        except (FileNotFoundError, ValueError):
            return None
        if record.get("format") not in (1, FORMAT_VERSION) or record.get("step") != step:
            return None
        files = {name: FileRecord(size=entry, sha256=None) if isinstance(entry, int) else
                 FileRecord(size=entry["size"], sha256=entry["sha256"]) for name, entry in record["files"].items()}
        if any(self.storage.size(f"{folder}/{name}") != file.size for name, file in files.items()):
            return None
        return Manifest(step=step, files=files, meta=record["meta"])

    def steps(self) -> list[int]:
        """Steps that have a folder, committed or not, in increasing order."""
        return sorted(int(match["step"]) for name in self.storage.list() if (match := STEP_FOLDER.match(name)))

    def committed(self) -> list[Manifest]:
        """Every complete checkpoint, oldest first."""
        return [m for step in self.steps() if (m := self.manifest(step)) is not None]

    def latest(self) -> Manifest | None:
        """The newest complete checkpoint, or None when there is none."""
        for step in reversed(self.steps()):
            if (manifest := self.manifest(step)) is not None:
                return manifest
        return None

    def read(self, step: int, name: str, *, expected: FileRecord | None = None) -> bytes:
        """One data file of a committed step; with `expected` (its manifest record) checked against its size
        and hash (`CheckpointCorrupt` names the file). A storage error is retried (`read_with_retries`)."""
        path = f"{step_folder(step)}/{name}"
        data = read_with_retries(lambda: self.storage.read_bytes(path), f"{self.url(step)}/{name}")
        if expected is not None:
            if len(data) != expected.size:
                raise CheckpointCorrupt(f"{self.url(step)}/{name}: {len(data)} bytes, the manifest says "
                                        f"{expected.size}")
            if expected.sha256 is not None and hashlib.sha256(data).hexdigest() != expected.sha256:
                raise CheckpointCorrupt(f"{self.url(step)}/{name}: its content does not match the SHA-256 in the "
                                        "manifest (changed after it was committed)")
        return data

    def set_aside(self, step: int) -> str:
        """Move committed step `step` out of the way (a damaged one, which the run will write again) to
        `step_<n>.damaged-<time>`, which no reader or pruning looks at; return where it went."""
        aside = f"{step_folder(step)}.damaged-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        self.storage.move(step_folder(step), aside)
        return self._url(aside)

    def read_verified(self, manifest: Manifest, name: str) -> bytes:
        """A file of `manifest`'s step, checked against its record there."""
        return self.read(manifest.step, name, expected=manifest.files[name])

    def best(self) -> Manifest | None:
        """The committed step with the highest val top-1 (`best_of`)."""
        return best_of(self.committed())

    def prune(self) -> None:
        """Keep the newest `keep_last` committed steps and the best by meta['val_top1']; delete the rest,
        and every uncommitted folder older than the newest commit (left by a crash)."""
        committed = self.committed()
        if not committed:
            return
        keep = {m.step for m in committed[-self.keep_last:]}
        if (best := best_of(committed)) is not None:
            keep.add(best.step)
        newest = committed[-1].step
        committed_steps = {m.step for m in committed}
        for step in self.steps():
            stale = step not in committed_steps and step < newest
            if stale or (step in committed_steps and step not in keep):
                self.storage.remove(step_folder(step))


def best_of(manifests: list[Manifest]) -> Manifest | None:
    """The step with the highest meta['val_top1'] (the newest of equals); None: none was scored."""
    scored = [m for m in manifests if m.meta.get("val_top1") is not None]
    return max(scored, key=lambda m: (m.meta["val_top1"], m.step)) if scored else None
