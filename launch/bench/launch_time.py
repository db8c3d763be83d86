"""`bench launch`: time to the first step under torchrun and under Ray, and Ray's restart latency after a
worker dies."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.orchestration.rundir import METRICS_FILE


@dataclass(frozen=True, slots=True)
class LaunchBench:
    """Seconds measured for one small 2-worker run under each launcher."""

    workers: int
    torchrun_first_step_s: float
    """From starting `torchrun` to the first step's report in metrics.jsonl."""
    ray_first_step_s: float
    """From starting `python -m launch train` (a new local Ray cluster) to the first step's report."""
    ray_restart_s: float
    """From SIGKILL to one Ray worker to the first report of a step after the resumed checkpoint."""

    def as_json(self) -> str:
        """One machine-readable line."""
        return json.dumps(dataclasses.asdict(self))

    def table(self) -> str:
        """The human-readable report."""
        return "\n".join([
            f"bench launch: {self.workers} CPU workers, DDP over gloo, digits at 8 px",
            f"{'launcher':<10} {'start to first step (s)':>24} {'worker death to resumed step (s)':>34}",
            f"{'torchrun':<10} {self.torchrun_first_step_s:>24.1f} {'-':>34}",
            f"{'ray':<10} {self.ray_first_step_s:>24.1f} {self.ray_restart_s:>34.1f}",
        ])


def bench_launch(*, data_root: str, scratch: Path, workers: int = 2) -> LaunchBench:
    """Start the same small run with torchrun and with Ray (new local cluster); under Ray, kill one worker
    after step 5 and time the restart. Every step is reported (tracking.log_interval_steps=1)."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    common = [f"data.root={data_root}", "data.image_size=8", "data.batch_size=32",
              "data.dali_threads=1", "data.loader_workers=1",
              "distributed.strategy=ddp", f"launch.num_workers={workers}", "tracking.log_interval_steps=1",
              "checkpoint.interval_steps=5", "schedule.epochs=1", "tracking.register=false",
              f"launch.runs_dir={scratch}"]

    def reports(name: str) -> list[dict[str, float]]:
        path = scratch / name / METRICS_FILE
        lines = path.read_text().splitlines() if path.is_file() else []
        return [record for record in map(json.loads, lines) if "loss" in record]

    def wait_for(name: str, condition: Any, timeout_s: float = 600) -> dict[str, float]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [record for record in reports(name) if condition(record)]
            if found:
                return found[0]
            time.sleep(0.05)
        raise TimeoutError(f"bench launch: run {name} reported nothing in {timeout_s} s")

    torchrun = Path(sys.executable).parent / "torchrun"
    start = time.time()
    process = subprocess.Popen([str(torchrun), "--nproc-per-node", str(workers), "-m", "launch", "train",
                                "--launcher", "torchrun", *common, "launch.name=torchrun"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    torchrun_first = wait_for("torchrun", lambda r: True)["time"] - start
    process.wait(timeout=600)  # a short run: let it finish rather than orphan its workers

    start = time.time()
    process = subprocess.Popen([sys.executable, "-m", "launch", "train", "--launcher", "ray", *common,
                                "launch.name=ray", "launch.max_failures=1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ray_first = wait_for("ray", lambda r: True)["time"] - start
        wait_for("ray", lambda r: r["step"] >= 6)  # checkpoint 5 is committed
        worker = next(p for p in psutil.process_iter(["cmdline"])
                      if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or []))
        killed = time.time()
        os.kill(worker.pid, signal.SIGKILL)
        resumed = wait_for("ray", lambda r: r["time"] > killed)
        ray_restart = resumed["time"] - killed
    finally:
        process.wait(timeout=600)
    return LaunchBench(workers=workers, torchrun_first_step_s=torchrun_first, ray_first_step_s=ray_first,
                       ray_restart_s=ray_restart)
