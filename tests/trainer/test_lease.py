"""One writer per checkpoint URL: a second launch is refused with the holder named, a restart of the same
launch and a holder that is gone (dead process, silent heartbeat) are taken over, claims made at once leave
at most one holder, a renewal that lands after a takeover gives the lease up, and a holder that was taken
over stops before it writes, or before it commits a step whose files it was writing. On a local folder, on
fsspec's memory:// store and on a real S3 server (object stores: no rename, no locks)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import cast

import pytest

import trainer
from configs import load_config
from data_pipeline.storage import FsspecStorage, Storage, open_storage
from trainer.checkpoint import open_checkpoints, step_folder
from trainer.dist import single_process_context
from trainer.lease import FOLDER, CheckpointInUse, Claimant, check_writer_lease, claim_writer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "memory", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "s3":  # a real S3 server: listings are eventually what was written, no rename
        return open_storage(f"{request.getfixturevalue('s3_bucket')}/ckpt")
    return open_storage(str(tmp_path / "checkpoints") if request.param == "local" else f"memory://{tmp_path}/ckpt")


def records(storage: Storage) -> list[dict[str, object]]:
    return [json.loads(storage.read_bytes(f"{FOLDER}/{name}")) for name in storage.list(FOLDER)]


def test_a_second_launch_is_refused_and_the_url_is_free_after_release(storage: Storage) -> None:
    held = claim_writer(storage, Claimant(run="first", launch="a" * 32), timeout_s=60)
    with pytest.raises(CheckpointInUse, match=r"is being written by run 'first' \(launch aaaaaaaa, host .*, pid "
                                              r"\d+, last heartbeat 0 s ago\)"):
        claim_writer(storage, Claimant(run="second", launch="b" * 32), timeout_s=60)
    assert [r["run"] for r in records(storage)] == ["first"]  # the refused claim left nothing behind
    held.release()
    assert records(storage) == []
    claim_writer(storage, Claimant(run="second", launch="b" * 32), timeout_s=60).release()


def test_a_restart_of_the_same_launch_replaces_its_own_claim(storage: Storage) -> None:
    claim_writer(storage, Claimant(run="run", launch="same"), timeout_s=60)  # an attempt that died holding it
    again = claim_writer(storage, Claimant(run="run", launch="same"), timeout_s=60)
    assert len(records(storage)) == 1
    again.release()


def test_a_holder_whose_heartbeat_stopped_is_taken_over(storage: Storage, capsys: pytest.CaptureFixture[str]) -> None:
    # A holder on another host (its process cannot be looked up from here), silent for 90 s.
    planted = {"run": "gone", "launch": "x" * 32, "host": "elsewhere", "pid_namespace": "pid:[1]", "pid": 4242,
               "started": time.time() - 100, "heartbeat": time.time() - 90}
    storage.write_bytes(f"{FOLDER}/00000000000000000001-elsewhere-4242.json", json.dumps(planted).encode())
    with pytest.raises(CheckpointInUse, match="run 'gone'"):  # within its timeout it still holds the URL
        claim_writer(storage, Claimant(run="new", launch="n" * 32), timeout_s=120)
    lease = claim_writer(storage, Claimant(run="new", launch="n" * 32), timeout_s=60)
    assert "taking over from run 'gone'" in capsys.readouterr().out
    assert [r["run"] for r in records(storage)] == ["new"]
    lease.release()


def test_a_holder_killed_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    url = str(tmp_path / "checkpoints")
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
            "from data_pipeline.storage import open_storage\n"
            "from trainer.lease import Claimant, claim_writer\n"
            f"claim_writer(open_storage({url!r}), Claimant(run='killed', launch='k' * 32), timeout_s=600)\n"
            "print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    with pytest.raises(CheckpointInUse, match="run 'killed'"):  # alive: refused
        claim_writer(open_storage(url), Claimant(run="next", launch="n" * 32), timeout_s=600)
    holder.kill()
    assert holder.wait() == -9
    storage = open_storage(url)
    assert [r["pid"] for r in records(storage)] == [holder.pid]  # the dead holder's record is still there
    lease = claim_writer(storage, Claimant(run="next", launch="n" * 32), timeout_s=600)
    assert [r["run"] for r in records(storage)] == ["next"]
    lease.release()


def test_claims_made_at_once_never_leave_two_holders(storage: Storage) -> None:
    held = 0
    for attempt in range(10):
        outcomes = claim_at_once(storage, [f"{attempt}-{name}" for name in "abcd"])
        # Never two holders, and the refused claims left no record (all four may back off at once: safe).
        assert len(outcomes) == 4 and outcomes.count("held") <= 1, attempt
        assert len(records(storage)) == outcomes.count("held"), attempt
        for name in storage.list(FOLDER):
            storage.remove(f"{FOLDER}/{name}")  # (its lease thread notices and stops renewing)
        held += outcomes.count("held")
    assert held > 0  # the race was won at least sometimes: the test did not pass by refusing everything


class OverlappingWrites:
    """A storage on which the first record write of each of `parties` threads starts when all have listed
    the records and returns when all have written: every claim sees the others (the race at its tightest)."""

    def __init__(self, storage: Storage, parties: int) -> None:
        self.storage = storage
        self.url = storage.url
        self.barrier = threading.Barrier(parties)
        self.waited: set[int] = set()
        self.overlaps = 0

    def write_bytes(self, path: str, data: bytes) -> None:
        first = path.startswith(FOLDER) and threading.get_ident() not in self.waited
        if first:  # every claim has listed an empty folder ...
            self.waited.add(threading.get_ident())
            self.barrier.wait(timeout=30)
        self.storage.write_bytes(path, data)
        if first and self.barrier.wait(timeout=30) == 0:  # ... and has written its record
            self.overlaps += 1

    def __getattr__(self, name: str) -> object:
        return getattr(self.storage, name)


def claim_at_once(storage: Storage, launches: list[str]) -> list[str]:
    """Claim `storage` from one thread per launch, their first records all written before any lists them;
    "held" or "refused" for each."""
    overlapping = OverlappingWrites(storage, len(launches))
    outcomes: list[str] = []

    def claim(launch: str) -> None:
        try:
            claim_writer(cast(Storage, overlapping), Claimant(run=launch, launch=launch), timeout_s=60)
            outcomes.append("held")
        except CheckpointInUse:
            outcomes.append("refused")

    threads = [threading.Thread(target=claim, args=(launch,)) for launch in launches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlapping.overlaps == 1  # the four first records were all there at one moment
    return outcomes


def test_a_holder_that_was_taken_over_stops_before_writing(storage: Storage) -> None:
    lease = claim_writer(storage, Claimant(run="slow", launch="s" * 32), timeout_s=60)
    check_writer_lease(lease, single_process_context())  # still held: no error
    # What a takeover does: another run removes the record of a holder it found silent, and claims.
    storage.remove(f"{FOLDER}/{storage.list(FOLDER)[0]}")
    claim_writer(storage, Claimant(run="fast", launch="f" * 32), timeout_s=60)
    with pytest.raises(CheckpointInUse, match=r"this run's claim was taken over .* held now by run 'fast'"):
        check_writer_lease(lease, single_process_context())
    lease.release()
    assert [r["run"] for r in records(storage)] == ["fast"]  # the old holder removed nothing of the new one's


class StalledRecordWrites:
    """A storage on which writes of one path block, once armed, until released (a renewal stuck in a slow
    PUT); it lists the records the moment the stalled write lands."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.url = storage.url
        self.stalled_path: str | None = None
        self.entered, self.release = threading.Event(), threading.Event()
        self.listed_on_landing: list[str] = []

    def write_bytes(self, path: str, data: bytes) -> None:
        stall = path == self.stalled_path
        if stall:
            self.entered.set()
            assert self.release.wait(timeout=30)
        self.storage.write_bytes(path, data)
        if stall:
            self.stalled_path = None
            self.listed_on_landing = self.storage.list(FOLDER)

    def __getattr__(self, name: str) -> object:
        return getattr(self.storage, name)


def test_a_renewal_that_lands_after_a_takeover_gives_the_lease_up(storage: Storage) -> None:
    stalling = StalledRecordWrites(storage)
    old = claim_writer(cast(Storage, stalling), Claimant(run="old", launch="o" * 32), timeout_s=1)
    stalling.stalled_path = old.path
    assert stalling.entered.wait(timeout=10)  # the old holder's renewal is stuck in its write
    time.sleep(1.2)  # ... past the timeout: its heartbeat is stale
    new = claim_writer(storage, Claimant(run="new", launch="n" * 32), timeout_s=1)
    stalling.release.set()
    old._thread.join(timeout=10)
    # The stalled write put the old record back beside the new holder's (the fault happened) ...
    assert sorted(stalling.listed_on_landing) == sorted([old.name, new.name])
    # ... and the old holder, listing after its write, gave the lease up and took its record away.
    assert old.lost and not old._thread.is_alive()
    with pytest.raises(CheckpointInUse, match="held now by run 'new'"):
        check_writer_lease(old, single_process_context())
    check_writer_lease(new, single_process_context())
    assert [r["run"] for r in records(storage)] == ["new"]
    new.release()
    old.release()


def take_over(storage: Storage) -> None:
    """What a run that found the holder silent does: remove its record and claim the URL."""
    for name in storage.list(FOLDER):
        storage.remove(f"{FOLDER}/{name}")
    claim_writer(storage, Claimant(run="usurper", launch="u" * 32), timeout_s=60)


class TakeOverAt:
    """A sink that takes the run's checkpoint URL over when the training report of `step` arrives."""

    def __init__(self, url: str, step: int) -> None:
        self.url, self.step = url, step

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step == self.step and "loss" in metrics:
            take_over(open_storage(self.url))

    def on_checkpoint(self, step: int, url: str) -> None:
        pass


@pytest.mark.parametrize("when", ["before the step's files", "while they are written", "never (negative control)"])
def test_a_trainer_that_was_taken_over_raises_at_its_next_save_and_commits_nothing(
        digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    url = str(tmp_path / "checkpoints")
    # 22 steps per epoch; reports every 5 steps, checkpoints every 10.
    cfg = load_config("quickstart", [f"data.root={digits_root}", "data.dataset=folder", "data.image_size=8",
                                     "data.batch_size=64",
                                     "data.dali_threads=1", "data.loader_workers=0", "schedule.epochs=1",
                                     "tracking.log_interval_steps=5", f"checkpoint.url={url}",
                                     "checkpoint.interval_steps=10", "checkpoint.keep_last=5"])
    sinks = [TakeOverAt(url, 15)] if when.startswith("before") else []
    if when.startswith("while"):
        write_bytes = FsspecStorage.write_bytes

        def write_then_lose(storage: FsspecStorage, path: str, data: bytes) -> None:
            write_bytes(storage, path, data)
            if path == f"{step_folder(20)}/model.pt":
                take_over(open_storage(url))

        monkeypatch.setattr(FsspecStorage, "write_bytes", write_then_lose)
    claimant = Claimant(run="trainer", launch="t" * 32)
    if when.startswith("never"):
        assert trainer.run(cfg, single_process_context(), sinks, claimant=claimant).steps == 22
        assert [m.step for m in open_checkpoints(url).committed()] == [10, 20, 22]
        return
    with pytest.raises(CheckpointInUse, match="this run's claim was taken over .* held now by run 'usurper'"):
        trainer.run(cfg, single_process_context(), sinks, claimant=claimant)
    assert [m.step for m in open_checkpoints(url).committed()] == [10]  # step 20 was never committed
    # Taken over before the save: not even its files were written; during: they were, but no manifest.
    written = sorted(p.name for p in (tmp_path / "checkpoints" / step_folder(20)).glob("*"))
    assert written == ([] if when.startswith("before") else ["model.pt", "rank_0.pt", "train_state.pt"])
    assert [r["run"] for r in records(open_storage(url))] == ["usurper"]  # the usurper's record was left alone
