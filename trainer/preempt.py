"""Preemption: SIGTERM asks the run to stop within a step or two, checkpoint there and exit for a requeue.

A preemptible or spot node is taken back with SIGTERM and a grace period before SIGKILL
(launch.preempt_grace_s). The signal sets this process's flag; after every step each rank starts an
asynchronous max-reduction of its flag and reads the previous step's, so all ranks learn of a SIGTERM to any
one of them at the same step, two or three steps after it came, and stop there together after a checkpoint.

The handler must be installed by the process's main thread (Python runs signal handlers there only). A
process whose main thread trains (one process, torchrun) gets it from `watch_for_preemption`; a Ray Train
worker trains in a thread of its own, and its launcher calls `install_sigterm_handler` in the worker's main
thread (replacing Ray's own handler, which ends the process at once).
"""

from __future__ import annotations

import collections
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

import torch

from trainer.dist import is_distributed


VOTE_LAG = 2
"""Steps between a vote and its reading: a SIGTERM during step k stops every rank after step k + 2 (k + 3 if it
came just after step k's vote)."""


class Preempted(Exception):
    """The run stopped on SIGTERM after committing a checkpoint it can resume from."""


class PreemptionFlag:
    """Set by SIGTERM; the loop reads it through `StopVote` after each step."""

    def __init__(self) -> None:
        self.grace_s = 30.0
        """launch.preempt_grace_s: what the stop should take at most."""
        self.requested = False
        self.requested_at: float | None = None
        """time.monotonic() when the first SIGTERM came."""

    def request(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: note the request and return at once (the step in flight finishes)."""
        if not self.requested:
            self.requested, self.requested_at = True, time.monotonic()

    def describe_stop(self) -> str:
        """How long the stop took since this process's SIGTERM, against the grace period ("" where another
        rank had the signal)."""
        if self.requested_at is None:
            return ""
        seconds = time.monotonic() - self.requested_at
        verdict = ("within" if seconds <= self.grace_s else
                   "LONGER than; the platform may kill a process before its checkpoint: shorten the steps or the "
                   "checkpoint write, or raise")
        return f", checkpoint committed {seconds:.1f} s after this process's SIGTERM ({verdict} " \
               f"launch.preempt_grace_s={self.grace_s:g})"

    def clear(self) -> None:
        self.requested, self.requested_at = False, None


PROCESS_FLAG = PreemptionFlag()
"""The flag SIGTERM sets in this process, whichever thread trains."""


def install_sigterm_handler() -> None:
    """Make SIGTERM set PROCESS_FLAG from now on. Must run in the main thread (a Ray worker's: see the module
    docstring)."""
    signal.signal(signal.SIGTERM, PROCESS_FLAG.request)


@contextlib.contextmanager
def watch_for_preemption(grace_s: float) -> Iterator[PreemptionFlag]:
    """This process's flag, cleared, while the block runs. In the main thread the block also installs the
    handler (and restores the previous one after it); elsewhere the handler is the launcher's to install.
    `grace_s`: launch.preempt_grace_s."""
    PROCESS_FLAG.clear()
    PROCESS_FLAG.grace_s = grace_s
    if threading.current_thread() is not threading.main_thread():
        yield PROCESS_FLAG
        return
    previous = signal.signal(signal.SIGTERM, PROCESS_FLAG.request)
    try:
        yield PROCESS_FLAG
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopVote:
    """After each step, whether any rank has had SIGTERM: a max-reduction of one value per step, started
    asynchronously and read VOTE_LAG steps later. On a GPU the result is copied to pinned host memory
    behind an event, so reading it waits for that copy only, never for the steps queued since: the host
    stays ahead of the device as without the vote. Every rank reads the same vote at the same step, so all
    stop at the same step."""

    def __init__(self, flag: PreemptionFlag, device: torch.device) -> None:
        self.flag = flag
        self.device = device
        self.pending: collections.deque[tuple[torch.Tensor, torch.distributed.Work | None,
                                              torch.cuda.Event | None]] = collections.deque()

    def after_step(self) -> bool:
        """Vote this rank's flag; True when the vote of VOTE_LAG steps ago (every rank's) says stop."""
        vote = torch.full((), float(self.flag.requested), device=self.device)
        work = (torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MAX, async_op=True)
                if is_distributed() else None)
        if vote.is_cuda:
            if work is not None:
                work.wait()  # on a GPU: makes the current stream wait for the reduction, not the host
            host = torch.empty((), pin_memory=True)
            host.copy_(vote, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((host, None, event))
        else:
            self.pending.append((vote, work, None))
        if len(self.pending) <= VOTE_LAG:
            return False
        agreed = self._read(self.pending.popleft())
        if agreed:
            while self.pending:  # finish the votes in flight before any other collective
                self._read(self.pending.popleft())
        return agreed

    @staticmethod
    def _read(entry: tuple[torch.Tensor, torch.distributed.Work | None, torch.cuda.Event | None]) -> bool:
        value, work, event = entry
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()
        return bool(value.item())
