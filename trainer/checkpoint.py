"""Checkpoints that are either complete or invisible: one folder per step, data files first, manifest last.

Layout under the checkpoint URL: `step_000001234/<files>` and `step_000001234/manifest.json`. The
manifest lists every file with its size and is written last, so a reader trusts a step only when the
manifest exists, parses and matches the files: a crash mid-write leaves the previous step as the latest.
A committed step is never written again (object stores have no atomic rename to protect it). Only the
newest `keep_last` steps and the best one by validation top-1 are kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from data_pipeline.storage import TEMPORARY_MARK, Storage, open_storage

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STEP_FOLDER = re.compile(r"^step_(?P<step>\d+)$")
"""The name of one step's folder; `step_folder` writes it."""


def step_folder(step: int) -> str:
    """The folder name of `step`, zero-padded so that names sort by step: `step_000001234`."""
    return f"step_{step:09d}"


def open_checkpoints(url: str, *, keep_last: int = 1) -> CheckpointManager:
    """The checkpoint manager of the checkpoints at `url` (a path or any URL `open_storage` takes).
    `keep_last` matters only to a writer; readers can leave it."""
    return CheckpointManager(open_storage(url), keep_last=keep_last)


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a committed checkpoint holds."""

    step: int
    """Optimiser steps taken when it was written."""
    files: dict[str, int]
    """File name -> size in bytes, for every data file of the step."""
    meta: dict[str, Any]
    """JSON facts written by the trainer (epoch, metrics, architecture, ...)."""


class CheckpointManager:
    """Saves and finds checkpoints in a `Storage`; see the module docstring for the guarantees."""

    def __init__(self, storage: Storage, *, keep_last: int) -> None:
        self.storage = storage
        self.keep_last = keep_last

    def url(self, step: int) -> str:
        """Where `step` lives."""
        return f"{self.storage.url.rstrip('/')}/{step_folder(step)}"

    def write(self, step: int, files: dict[str, bytes]) -> None:
        """Write data files of `step` (every rank writes its own); nothing is visible until `commit`."""
        if self.manifest(step) is not None:
            raise FileExistsError(f"checkpoint {self.url(step)} is already committed; a step is never overwritten")
        for name, data in files.items():
            self.storage.write_bytes(f"{step_folder(step)}/{name}", data)

    def commit(self, step: int, meta: dict[str, Any]) -> Manifest:
        """Make `step` visible: list its files with their sizes in the manifest, then prune old steps.
        Call once, on one process, after every writer has finished."""
        folder = step_folder(step)
        names = [name for name in self.storage.list(folder) if name != MANIFEST and TEMPORARY_MARK not in name]
        files = {name: self.storage.size(f"{folder}/{name}") or 0 for name in names}
        manifest = Manifest(step=step, files=files, meta=meta)
        record = {"format": FORMAT_VERSION, "step": step, "files": files, "meta": meta}
        self.storage.write_bytes(f"{folder}/{MANIFEST}", json.dumps(record, indent=1).encode())
        self.prune()
        return manifest

    def save(self, step: int, files: dict[str, bytes], meta: dict[str, Any]) -> Manifest:
        """`write` then `commit`, for a single writer."""
        self.write(step, files)
        return self.commit(step, meta)

    def manifest(self, step: int) -> Manifest | None:
        """The manifest of `step` if it is complete and every file it lists is there at its size, else None."""
        folder = step_folder(step)
        try:
            record = json.loads(self.storage.read_bytes(f"{folder}/{MANIFEST}"))
        except (FileNotFoundError, ValueError):
            return None
        if record.get("format") != FORMAT_VERSION or record.get("step") != step:
            return None
        files = record["files"]
        if any(self.storage.size(f"{folder}/{name}") != size for name, size in files.items()):
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

    def read(self, step: int, name: str) -> bytes:
        """One data file of a committed step."""
        return self.storage.read_bytes(f"{step_folder(step)}/{name}")

    def prune(self) -> None:
        """Keep the newest `keep_last` committed steps and the best by meta['val_top1']; delete the rest,
        and every uncommitted folder older than the newest commit (left by a crash)."""
        committed = self.committed()
        if not committed:
            return
        keep = {m.step for m in committed[-self.keep_last:]}
        scored = [m for m in committed if m.meta.get("val_top1") is not None]
        if scored:
            keep.add(max(scored, key=lambda m: (m.meta["val_top1"], m.step)).step)
        newest = committed[-1].step
        committed_steps = {m.step for m in committed}
        for step in self.steps():
            stale = step not in committed_steps and step < newest
            if stale or (step in committed_steps and step not in keep):
                self.storage.remove(step_folder(step))
