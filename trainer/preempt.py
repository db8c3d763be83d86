"""Preemption: SIGTERM asks the run to stop at the next report, checkpoint there and exit for a requeue."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

class Preempted(Exception):
    """The run stopped on SIGTERM after committing a checkpoint it can resume from."""


class PreemptionFlag:
    """Set by SIGTERM; the loop reads it at report points, where all ranks agree to stop at the same step."""

    def __init__(self) -> None:
        self.requested = False

    def request(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: note the request and return at once (the step in flight finishes)."""
        self.requested = True


@contextlib.contextmanager
def watch_for_preemption() -> Iterator[PreemptionFlag]:
    """Handle SIGTERM while the block runs (in the main thread only: elsewhere signals cannot be caught)."""
    flag = PreemptionFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, flag.request)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
