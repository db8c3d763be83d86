"""One writer per checkpoint URL: the lease a run holds on it while it trains.

Two live runs writing one URL would mix their files, prune each other's steps and register each other's
models. So the primary process of a run claims the URL before it trains: it writes a record
`writers/<claim>.json` there (run, launch, host, process, heartbeat) and rewrites its heartbeat every
`timeout_s / 10` from a background thread; the record is removed when the run ends.

A claim refuses a URL that another launch holds, naming it. A record counts as gone, and is taken over,
when its heartbeat is older than `timeout_s`, or at once when it belongs to a process of this host that no
longer exists. A record of the same launch (an attempt that Ray or torchrun restarted) is replaced.

What is guaranteed, on storage where a finished write shows in the next listing (local and shared file
systems, S3, GCS, Azure Blob): no two claims both succeed. Each claimant writes its record, then lists the
records, and goes on only if its own is the one there: of two claims made at once, the later writer sees
the earlier record. (Both may see each other and withdraw; each then tries again after a random pause.)
No rename and no lock are needed: a record is created once, then rewritten only by its owner. Record names
begin with the claim's time, so a later claim sorts after an earlier one. A holder checks, before it writes
a step's files and again immediately before it commits the step, that its record is still there and no
later claim's is, so a run that was taken over (it stopped renewing for `timeout_s`: a hung process, a
partition) stops at its next checkpoint without committing it. A renewal lists the records after each
write: one that stalled through a takeover and put the old record back finds the new holder's, removes its
own and gives up the lease. Not guaranteed: a takeover between that last check and the manifest's write
(no object store offers a conditional write to close it); a taken-over run may have written data files of
that step (never committed, pruned later); heartbeat ages compare the clocks of two hosts, which must agree
to well within `timeout_s`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from configs.errors import UserError
from data_pipeline.storage import Storage
from trainer.dist import DistContext, all_reduce_max

FOLDER = "writers"
"""Under the checkpoint URL: one record per claim."""


class CheckpointInUse(UserError):
    """Another live run writes to the checkpoint URL (or took it over from this one)."""


def new_launch_id() -> str:
    """An id for one launch of a run, which its restarts share: torchrun's run id when torchrun started this
    process with one (--rdzv-id, or --standalone's own), else a new one."""
    given = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return given if given != "none" else uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Claimant:
    """Who claims a checkpoint URL."""

    run: str
    """The run's name."""
    launch: str
    """One launch of the run (`new_launch_id`): the same for every attempt a launcher restarts."""


def _this_process() -> dict[str, Any]:
    """Where a record's process lives: host, pid namespace (containers on one host share a host name) and pid."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return {"host": socket.gethostname(), "pid_namespace": namespace, "pid": os.getpid()}


def _is_gone(record: dict[str, Any], *, now: float, timeout_s: float) -> bool:
    """Whether the record's owner no longer runs: silent for `timeout_s`, or a process of this host that
    has exited."""
    if now - record["heartbeat"] > timeout_s:
        return True
    here = _this_process()
    if (record["host"], record["pid_namespace"]) != (here["host"], here["pid_namespace"]) or not here["pid_namespace"]:
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def describe(record: dict[str, Any], *, now: float) -> str:
    """One line on who holds a record."""
    return (f"run {record['run']!r} (launch {record['launch'][:8]}, host {record['host']}, pid {record['pid']}, "
            f"last heartbeat {now - record['heartbeat']:.0f} s ago)")


class WriterLease:
    """A held claim on a checkpoint URL; see the module docstring. Use `claim_writer` to get one."""

    def __init__(self, storage: Storage, name: str, record: dict[str, Any], *, timeout_s: float) -> None:
        self.storage = storage
        self.name = name
        self.path = f"{FOLDER}/{name}"
        self.record = record
        self.timeout_s = timeout_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="checkpoint-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise `CheckpointInUse` if the lease was taken over: its record is gone, or a claim made after it is
        there (call immediately before committing a step)."""
        if self.lost or self._overtaken():
            self.lost = True
            holders = [describe(record, now=time.time()) for _, record in _records(self.storage)]
            raise CheckpointInUse(f"{self.storage.url}: this run's claim was taken over (it renewed nothing for "
                                  f"{self.timeout_s:.0f} s); held now by {', '.join(holders) or 'nobody'}")

    def _overtaken(self) -> bool:
        """Whether this claim's record is gone or a later claim's record is there. (A record older than this
        claim is a taken-over holder's renewal that landed late; that holder sees this one and withdraws.)"""
        names = [name for name, _ in _records(self.storage)]
        return self.name not in names or any(name > self.name for name in names)

    def release(self) -> None:
        """Stop renewing and remove the record (a finished or failed run; a killed one leaves it to expire)."""
        self._stop.set()
        self._thread.join()
        if not self.lost:
            self.storage.remove(self.path)

    def _renew(self) -> None:
        while not self._stop.wait(self.timeout_s / 10):
            try:
                if self.storage.size(self.path) is None:  # taken over: never write it back
                    self.lost = True
                    return
                self.record["heartbeat"] = time.time()
                self.storage.write_bytes(self.path, json.dumps(self.record).encode())
                # A write that stalled through a takeover has just put this record back beside the new
                # holder's: listing after the write sees that, and takes the record away again.
                if self._overtaken():
                    self.lost = True
                    self.storage.remove(self.path)
                    return
            except OSError:
                pass  # storage briefly unreachable: the next renewal tries again


def _records(storage: Storage) -> list[tuple[str, dict[str, Any]]]:
    """The claim records at a URL, by name (oldest claim first); unreadable ones are skipped."""
    found = []
    for name in storage.list(FOLDER):
        if not name.endswith(".json"):
            continue  # a local write's temporary file
        try:
            found.append((name, json.loads(storage.read_bytes(f"{FOLDER}/{name}"))))
        except (FileNotFoundError, ValueError):
            pass  # removed meanwhile, or half-written by a store without atomic writes
    return found


def claim_writer(storage: Storage, claimant: Claimant, *, timeout_s: float) -> WriterLease:
    """Claim the checkpoint URL of `storage` for `claimant`, or raise `CheckpointInUse` naming its holder."""
    here = _this_process()
    for attempt in range(4):
        now = time.time()
        for name, record in _records(storage):
            if record["launch"] == claimant.launch:
                storage.remove(f"{FOLDER}/{name}")  # an earlier attempt of this launch
            elif _is_gone(record, now=now, timeout_s=timeout_s):
                print(f"{storage.url}: taking over from {describe(record, now=now)}, which no longer runs",
                      flush=True)
                storage.remove(f"{FOLDER}/{name}")
            else:
                raise CheckpointInUse(_refusal(storage, record, now=now, timeout_s=timeout_s))
        name = f"{time.time_ns():020d}-{here['host']}-{here['pid']}.json"
        record = {"run": claimant.run, "launch": claimant.launch, **here, "started": now, "heartbeat": now}
        storage.write_bytes(f"{FOLDER}/{name}", json.dumps(record).encode())
        # Written first, then listed: of two claims made at once, at least one sees the other's record. A
        # claim that sees another withdraws, waits a random moment and tries again from the start, where a
        # record that is still there (the other claim went on) refuses it.
        if [other for other, _ in _records(storage) if other != name] == []:
            return WriterLease(storage, name, record, timeout_s=timeout_s)
        storage.remove(f"{FOLDER}/{name}")
        time.sleep(random.uniform(0.05, 0.2) * 2 ** attempt)
    raise CheckpointInUse(f"{storage.url}: other runs kept claiming it at the same moment; try again")


def _refusal(storage: Storage, record: dict[str, Any], *, now: float, timeout_s: float) -> str:
    return (f"{storage.url} is being written by {describe(record, now=now)}: two runs must not write one "
            f"checkpoint URL. Wait for it to end, or give this run another checkpoint.url; a holder that "
            f"stopped is taken over once its heartbeat is {timeout_s:.0f} s old (checkpoint.lease_timeout_s).")




@contextlib.contextmanager
def hold_writer_lease(storage: Storage | None, claimant: Claimant | None, ctx: DistContext, *,
                      timeout_s: float) -> Iterator[WriterLease | None]:
    """On every rank: the primary claims `storage` for `claimant` for the duration of the block and releases
    it after; a refused claim raises `CheckpointInUse` on all ranks together. Nothing is claimed without a
    storage or a claimant (the launchers give one; a bare `trainer.run` has none)."""
    lease, problem = None, None
    if storage is not None and claimant is not None and ctx.is_primary:
        try:
            lease = claim_writer(storage, claimant, timeout_s=timeout_s)
        except CheckpointInUse as error:
            problem = str(error)
    raise_together(problem, ctx)
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()


def check_writer_lease(lease: WriterLease | None, ctx: DistContext) -> None:
    """On every rank before a checkpoint is written: raise `CheckpointInUse` on all ranks together if the
    primary's lease was taken over."""
    problem = None
    if lease is not None:
        try:
            lease.check()
        except CheckpointInUse as error:
            problem = str(error)
    raise_together(problem, ctx)


def raise_together(problem: str | None, ctx: DistContext) -> None:
    """Raise `CheckpointInUse(problem)` on every rank if any rank has a problem (one collective)."""
    failed = all_reduce_max(torch.tensor(float(problem is not None), device=ctx.device))
    if failed.item():
        raise CheckpointInUse(problem or "the primary process could not hold the checkpoint URL (see its error)")


__all__ = ["CheckpointInUse", "Claimant", "WriterLease", "check_writer_lease", "claim_writer", "hold_writer_lease",
           "new_launch_id"]
