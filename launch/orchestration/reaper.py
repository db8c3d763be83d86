"""Nothing of a local Ray cluster outlives the driver that started it.

`ray.init()` without an address starts a whole cluster under the driver: GCS, raylet, dashboard, workers,
and the raylet's per-node agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`). A driver that exits
normally shuts it down; one that is killed (SIGKILL, the OOM killer) takes the GCS and raylet with it, but
the agents live on, orphaned, and pile up on a shared node with every killed run.

So the launcher that starts a local cluster also starts this watchdog, in a session of its own (a signal to
the driver's process group does not reach it). It notes the driver's descendants every second while the
driver lives; once the driver is gone it stops those still running (SIGTERM, then SIGKILL after a grace
period) and exits. Processes are matched by pid and start time, so a reused pid is never hit.

Run as a file (`python reaper.py DRIVER_PID`): it imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 1.0
"""How often the watchdog notes the driver's descendants and checks that the driver still runs."""
GRACE_S = 5.0
"""After SIGTERM, how long a leftover process has to exit before SIGKILL."""


def start_reaper(driver_pid: int) -> subprocess.Popen[bytes]:
    """Start the watchdog of `driver_pid` (this process, normally) in a session of its own."""
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(driver_pid)], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def watch(driver_pid: int) -> list[int]:
    """Wait for `driver_pid` to end, then stop what of its process tree is still running; the pids stopped."""
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return []
    seen: dict[int, psutil.Process] = {}
    while True:
        try:
            for child in driver.children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        if not driver.is_running() or driver.status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(POLL_S)
    # is_running() compares the start time too: a pid reused by another process is left alone.
    left = [process for pid, process in seen.items() if pid != os.getpid() and process.is_running()]
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(left, timeout=GRACE_S)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return [process.pid for process in left]


if __name__ == "__main__":
    watch(int(sys.argv[1]))
