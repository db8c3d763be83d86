"""`bench elastic`: what a shrink and a grow of an elastic Ray run cost, on a two-node cluster on this machine.

A head and a second node process (Ray's cluster utilities, as `ray start --head` and `ray start --address`
would make them; one CPU each) run a small digits job with `launch.num_workers=[1, 2]` (3 epochs, so that the
shrunk group is still training when the grow comes). After checkpoint 5 the second node is removed (a lost
node): the group shrinks to 1 worker. Once that worker has reported a
step, a node is added: the group grows back to 2 at its next resize check. For each event: seconds from it
to the first step the new group reports (every step is reported) and the steps redone.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from configs.extras import import_extra
from launch.orchestration.rundir import METRICS_FILE
from launch.orchestration.starts import read_starts
from trainer.metrics import read_reports


@dataclass(frozen=True, slots=True)
class ResizeCost:
    """One change of size."""

    event: str
    old_world_size: int
    new_world_size: int
    seconds_to_resumed_step: float
    """From the node's removal (or addition) to the first step the new group reported."""
    steps_redone: int


@dataclass(frozen=True, slots=True)
class ElasticBench:
    """The settings and the measured resizes."""

    resize_interval_s: float
    group_start_timeout_s: float
    rows: list[ResizeCost]

    def as_json(self) -> str:
        """One machine-readable line."""
        return json.dumps(dataclasses.asdict(self))

    def table(self) -> str:
        """The human-readable report."""
        lines = [f"bench elastic: digits at 8 px, 2 one-CPU Ray nodes, DDP over gloo, checkpoints every 5 steps; "
                 f"launch.resize_interval_s={self.resize_interval_s:g}, "
                 f"launch.group_start_timeout_s={self.group_start_timeout_s:g}",
                 f"{'event':<22} {'workers':>8} {'s to first resumed step':>24} {'steps redone':>13}"]
        for row in self.rows:
            lines.append(f"{row.event:<22} {f'{row.old_world_size} -> {row.new_world_size}':>8} "
                         f"{row.seconds_to_resumed_step:>24.1f} {row.steps_redone:>13}")
        return "\n".join(lines)


def bench_elastic(*, data_root: str, scratch: Path, resize_interval_s: float,
                  group_start_timeout_s: float) -> ElasticBench:
    """Run the job described in the module docstring and measure its two resizes."""
    cluster_utils = import_extra("ray.cluster_utils")
    run_dir = scratch / "elastic"
    args = [f"data.root={data_root}", "data.image_size=8", "data.batch_size=32",
            "data.dali_threads=1", "data.loader_workers=1",
            "distributed.strategy=ddp", "schedule.epochs=3", "checkpoint.interval_steps=5",
            "tracking.log_interval_steps=1", "tracking.enabled=false", f"launch.runs_dir={scratch}",
            "launch.name=elastic", "launch.num_workers=[1, 2]", "launch.max_failures=4",
            f"launch.resize_interval_s={resize_interval_s}", f"launch.group_start_timeout_s={group_start_timeout_s}"]

    def reports() -> list[dict[str, float]]:
        return [record for record in read_reports(run_dir / METRICS_FILE) if "loss" in record]

    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        driver = subprocess.Popen([sys.executable, "-m", "launch", "train", *args,
                                   f"launch.ray_address={cluster.address}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def wait(condition: Callable[[], bool], what: str) -> None:
                deadline = time.monotonic() + 600
                while not condition():
                    if driver.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"bench elastic: {what} was not seen (the run ended or took too long)")
                    time.sleep(0.05)

            def first_report_of_start(index: int) -> float:
                wait(lambda: len(read_starts(run_dir)) > index, f"start {index + 1}")
                begun = read_starts(run_dir)[index].time
                wait(lambda: any(r["time"] > begun for r in reports()), f"a step of start {index + 1}")
                return next(r["time"] for r in reports() if r["time"] > begun)

            wait(lambda: any(r["step"] >= 6 for r in reports()), "step 6")  # checkpoint 5 is committed
            removed = time.time()
            cluster.remove_node(second)
            shrunk = first_report_of_start(1)
            added = time.time()
            cluster.add_node(num_cpus=1)
            grown = first_report_of_start(2)
            driver.wait(timeout=600)
        finally:
            driver.kill()
    finally:
        cluster.shutdown()
    starts = read_starts(run_dir)
    return ElasticBench(resize_interval_s=resize_interval_s, group_start_timeout_s=group_start_timeout_s, rows=[
        ResizeCost(event="shrink (node removed)", old_world_size=starts[0].world_size,
                   new_world_size=starts[1].world_size, seconds_to_resumed_step=shrunk - removed,
                   steps_redone=starts[1].redone),
        ResizeCost(event="grow (node added)", old_world_size=starts[1].world_size,
                   new_world_size=starts[2].world_size, seconds_to_resumed_step=grown - added,
                   steps_redone=starts[2].redone)])

