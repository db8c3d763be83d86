"""Checkpoint commits: manifest last, only complete steps trusted, keep N plus best, never overwrite."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from data_pipeline.storage import open_storage
from trainer.checkpoint import CheckpointCorrupt, CheckpointManager, FileRecord, open_checkpoints, step_folder


@pytest.fixture(params=["memory", "local", "s3"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointManager:
    url = {"memory": f"memory://ckpt-{uuid.uuid4().hex}", "local": str(tmp_path / "ckpt"),
           "s3": f"{request.getfixturevalue('s3_bucket')}/ckpt"}[request.param]
    return open_checkpoints(url, keep_last=2)


def test_save_and_read_back(manager: CheckpointManager) -> None:
    manager.save(10, {"model.pt": b"weights", "rank_0.pt": b"rng"}, {"epoch": 1})
    latest = manager.latest()
    assert latest is not None and latest.step == 10 and latest.meta == {"epoch": 1}
    assert latest.files == {"model.pt": FileRecord.of(b"weights"), "rank_0.pt": FileRecord.of(b"rng")}
    assert latest.files["model.pt"] == FileRecord(size=7, sha256=hashlib.sha256(b"weights").hexdigest())
    assert manager.read(10, "model.pt") == b"weights"


def test_no_checkpoint_means_no_latest(manager: CheckpointManager) -> None:
    assert manager.latest() is None and manager.committed() == []


def test_a_crash_before_the_manifest_leaves_the_previous_step_latest(manager: CheckpointManager) -> None:
    manager.save(10, {"model.pt": b"old"}, {})
    manager.write(20, {"model.pt": b"new, never committed"})
    latest = manager.latest()
    assert latest is not None and latest.step == 10
    assert manager.read(latest.step, "model.pt") == b"old"


def test_a_file_changed_after_commit_makes_the_step_untrusted(manager: CheckpointManager) -> None:
    manager.save(10, {"model.pt": b"old"}, {})
    manager.save(20, {"model.pt": b"new"}, {})
    manager.storage.write_bytes(f"{step_folder(20)}/model.pt", b"t")  # truncated: 1 byte, manifest says 3
    latest = manager.latest()
    assert latest is not None and latest.step == 10


def test_a_torn_manifest_is_not_trusted(manager: CheckpointManager) -> None:
    manager.save(10, {"model.pt": b"old"}, {})
    manager.write(20, {"model.pt": b"new"})
    manager.storage.write_bytes(f"{step_folder(20)}/manifest.json", b'{"format": 1, "st')
    latest = manager.latest()
    assert latest is not None and latest.step == 10


def test_a_committed_step_is_never_overwritten(manager: CheckpointManager) -> None:
    manager.save(10, {"model.pt": b"first"}, {})
    with pytest.raises(FileExistsError, match=r"step_000000010 is already committed"):
        manager.save(10, {"model.pt": b"second"}, {})
    assert manager.read(10, "model.pt") == b"first"


def test_keeps_the_last_n_plus_the_best(manager: CheckpointManager) -> None:
    for step, top1 in zip((1, 2, 3, 4, 5), (0.5, 0.9, 0.6, 0.7, 0.65), strict=True):
        manager.save(step, {"model.pt": b"x"}, {"val_top1": top1})
    assert [m.step for m in manager.committed()] == [2, 4, 5]


def test_uncommitted_leftovers_older_than_the_newest_commit_are_removed(manager: CheckpointManager) -> None:
    manager.save(1, {"model.pt": b"x"}, {})
    manager.write(2, {"model.pt": b"crashed"})
    manager.save(3, {"model.pt": b"y"}, {})
    assert manager.steps() == [1, 3]


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(str(tmp_path))
    storage.write_bytes("a/file.bin", b"old")

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes("a/file.bin", b"new")
    assert storage.read_bytes("a/file.bin") == b"old"
    assert os.listdir(tmp_path / "a") == ["file.bin"]  # the temporary sat beside it and is gone


def test_file_url_and_plain_path_reach_the_same_files(tmp_path: Path) -> None:
    open_storage(str(tmp_path)).write_bytes("x/y.txt", b"hello")
    assert open_storage(f"file://{tmp_path}").read_bytes("x/y.txt") == b"hello"
    assert open_storage(f"file://{tmp_path}").list("x") == ["y.txt"]


def test_the_manifest_lists_what_the_writers_reported_not_what_a_listing_shows(manager: CheckpointManager) -> None:
    # Two ranks write their own files; rank 0 commits from both reports. A file in the folder that no rank
    # reported (a stale leftover) is not listed, and a reported file that is missing makes the step untrusted.
    rank0 = manager.write(10, {"model.pt": b"weights", "rank_0.pt": b"a"})
    rank1 = manager.write(10, {"rank_1.pt": b"bb"})
    manager.storage.write_bytes(f"{step_folder(10)}/stray.pt", b"left over")
    manifest = manager.commit(10, {}, {**rank0, **rank1})
    assert set(manifest.files) == {"model.pt", "rank_0.pt", "rank_1.pt"}
    assert manager.latest() == manifest
    manager.storage.remove(f"{step_folder(10)}/rank_1.pt")  # as a stale listing would have missed it
    assert manager.latest() is None


def test_a_flipped_byte_of_the_same_size_fails_the_hash(manager: CheckpointManager) -> None:
    manifest = manager.save(10, {"model.pt": b"weights"}, {})
    manager.storage.write_bytes(f"{step_folder(10)}/model.pt", b"weighTs")  # same size: the listing trusts it
    assert manager.latest() == manifest
    with pytest.raises(CheckpointCorrupt, match=r"step_000000010/model.pt: its content does not match the SHA-256"):
        manager.read_verified(manifest, "model.pt")


def test_a_manifest_of_format_1_is_still_read(manager: CheckpointManager) -> None:
    manager.storage.write_bytes(f"{step_folder(5)}/model.pt", b"old")
    manager.storage.write_bytes(f"{step_folder(5)}/manifest.json",
                                json.dumps({"format": 1, "step": 5, "files": {"model.pt": 3}, "meta": {}}).encode())
    manifest = manager.latest()
    assert manifest is not None and manifest.files == {"model.pt": FileRecord(size=3, sha256=None)}
    assert manager.read_verified(manifest, "model.pt") == b"old"

