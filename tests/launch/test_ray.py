"""The Ray launcher on a real local Ray cluster with 2 CPU workers: a worker killed (SIGKILL) or stopped
(SIGTERM) mid-epoch is restarted and the run reaches the weights of an uninterrupted run, with every step in
the metrics once; a run out of restarts ends with an error naming its last good checkpoint, which a later
`--resume` continues to the same weights."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from configs import load_config
from tests.multiproc import run_ranks
from trainer.checkpoint import open_checkpoints
from trainer.serialize import from_bytes

# `make test` installs the ray extra: without it these tests must fail to import, not skip.
import ray  # noqa: F401, E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# 2 epochs of 22 steps of 2 x 32 images at 8 px; checkpoints every 5 steps and at each epoch's end.
COMMON = ["data.image_size=8", "data.batch_size=32", "data.num_workers=1", "distributed.strategy=ddp",
          "schedule.epochs=2", "checkpoint.interval_steps=5", "checkpoint.keep_last=2",
          "tracking.log_interval_steps=5", "tracking.register=false"]
TOTAL_STEPS = 44


def overrides(root: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [f"data.root={root}", *COMMON, f"launch.runs_dir={runs}", f"launch.name={name}", "launch.num_workers=2",
            *extra]


def final_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    manager = open_checkpoints(str(checkpoint_dir), keep_last=1)
    manifest = manager.latest()
    assert manifest is not None and manifest.step == TOTAL_STEPS
    return from_bytes(manager.read(manifest.step, "model.pt"))


@pytest.fixture(scope="module")
def uninterrupted(digits_root: Path, module_tmp: Path) -> dict[str, torch.Tensor]:
    """The weights 2 gloo processes reach without any failure (the same loop, without Ray)."""
    folder = module_tmp / "uninterrupted"
    cfg = load_config("quickstart", [f"data.root={digits_root}", *COMMON, f"checkpoint.url={folder}"])
    run_ranks(cfg)
    return final_weights(folder)


def start_training(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m launch train` in a new process (its own local Ray cluster), output to `log`."""
    with log.open("wb") as output:
        return subprocess.Popen([sys.executable, "-m", "launch", "train", *args], cwd=REPO, stdout=output,
                                stderr=subprocess.STDOUT)


def train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes running on this machine."""
    return [p for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def wait_for_report(metrics: Path, *, after_step: int, timeout_s: float = 300) -> int:
    """Wait until metrics.jsonl holds a training report beyond `after_step`; return its step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics.is_file():
            steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
            if steps and steps[-1] > after_step:
                return int(steps[-1])
        time.sleep(0.2)
    raise TimeoutError(f"no training report after step {after_step} in {metrics}")


def finish(driver: subprocess.Popen[bytes], log: Path, timeout_s: float = 600) -> str:
    driver.wait(timeout=timeout_s)
    return log.read_text(errors="replace")


def assert_every_step_once(run_dir: Path) -> None:
    """Training reports every 5 steps and at each epoch's end, evaluations at each epoch's end, each once and
    in order: the lines an attempt wrote after its last checkpoint were dropped when the next one resumed."""
    reports = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports if "loss" in r] == [5, 10, 15, 20, 22, 25, 30, 35, 40, 44]
    assert [r["step"] for r in reports if "val_top1" in r] == [22, 44]


def test_killed_and_preempted_workers_are_restarted_and_reach_the_uninterrupted_weights(
        digits_root: Path, tmp_path: Path, uninterrupted: dict[str, torch.Tensor]) -> None:
    log = tmp_path / "faults.log"
    driver = start_training(overrides(digits_root, tmp_path, "faults", "launch.max_failures=4",
                                      "tracking.register=true"), log)
    metrics = tmp_path / "faults" / "metrics.jsonl"
    try:
        wait_for_report(metrics, after_step=5)
        killed = train_workers()[-1].pid
        assert f"pid={killed}) world_rank=" in log.read_text(errors="replace")  # a worker of this run
        os.kill(killed, signal.SIGKILL)  # a lost process, mid-epoch
        sigterm_after = wait_for_report(metrics, after_step=15)
        stopped = train_workers()[0].pid
        os.kill(stopped, signal.SIGTERM)  # a preemption, later in the run
        output = finish(driver, log)
    finally:
        driver.kill()
    assert driver.returncode == 0, output[-5000:]
    # The driver saw both failures, each of a process of this run, and each time started a new worker group
    # that resumed from a step committed before the fault (under Ray, SIGTERM ends a worker like a kill).
    assert sigterm_after > 15
    assert "Error count: 1 " in output and "Error count: 2 " in output and "Error count: 3 " not in output
    assert f"pid={stopped}) world_rank=" in output and f"pid: {killed}" in output
    resumed = [int(step) for step in re.findall(r"run faults: resnet18 on 2 x cpu, resuming from step (\d+)", output)]
    assert len(resumed) == 2 and all(step % 5 == 0 for step in resumed), output[-5000:]
    assert 5 <= resumed[0] <= 15 <= resumed[1] <= sigterm_after, output[-5000:]
    weights = final_weights(tmp_path / "faults" / "checkpoints")
    for key, value in uninterrupted.items():
        assert torch.equal(weights[key], value), key
    assert_every_step_once(tmp_path / "faults")
    summary = json.loads((tmp_path / "faults" / "summary.json").read_text())
    assert summary["steps"] == TOTAL_STEPS and summary["world_size"] == 2
    assert output.count("val top-1") == 1  # the driver's summary; workers print none
    assert_registered_once(tmp_path, summary)


def assert_registered_once(runs: Path, summary: dict[str, object]) -> None:
    """A run that ends again after it registered its model (as an attempt Ray restarts after registering
    does: the same run and final step) registers no second version."""
    from mlflow import MlflowClient

    again = subprocess.run([sys.executable, "-m", "launch", "train", "--resume", "faults", f"launch.runs_dir={runs}"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-3000:]
    assert "resuming from step 44" in again.stdout
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    versions = client.search_model_versions("name='resnet18-digits'")
    assert [(str(v.version), v.run_id, v.tags["step"]) for v in versions] == [("1", summary["mlflow_run_id"], "44")]
    assert json.loads((runs / "faults" / "summary.json").read_text())["model_uri"] == "models:/resnet18-digits/1"


def test_out_of_restarts_names_the_last_checkpoint_and_a_later_resume_finishes(
        digits_root: Path, tmp_path: Path, uninterrupted: dict[str, torch.Tensor]) -> None:
    log = tmp_path / "fragile.log"
    driver = start_training(overrides(digits_root, tmp_path, "fragile", "launch.max_failures=0"), log)
    try:
        wait_for_report(tmp_path / "fragile" / "metrics.jsonl", after_step=10)
        os.kill(train_workers()[0].pid, signal.SIGKILL)
        output = finish(driver, log)
    finally:
        driver.kill()
    assert driver.returncode == 4, output[-5000:]
    checkpoints = open_checkpoints(str(tmp_path / "fragile" / "checkpoints"), keep_last=1)
    latest = checkpoints.latest()
    assert latest is not None and 10 <= latest.step < TOTAL_STEPS  # committed and intact
    assert (f"run fragile failed 1 times (launch.max_failures=0); the last good checkpoint is "
            f"{checkpoints.url(latest.step)} (step {latest.step}); continue it with "
            "`python -m launch train --resume fragile`") in output

    # Later, with the process tree gone: continue by name.
    resumed = subprocess.run([sys.executable, "-m", "launch", "train", "--resume", "fragile",
                              f"launch.runs_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-5000:] + resumed.stderr[-3000:]
    assert f"resuming from step {latest.step}" in resumed.stdout
    weights = final_weights(tmp_path / "fragile" / "checkpoints")
    for key, value in uninterrupted.items():
        assert torch.equal(weights[key], value), key
    assert_every_step_once(tmp_path / "fragile")


@pytest.mark.parametrize(("extra", "status", "message"), [
    (["model.num_classes=7"], 2, r"error: worker rank \d: model.num_classes=7 but the data set at data.root=.* has "
                                 r"10 classes"),
    (["optim.lr=1e30", "schedule.warmup_epochs=0", "optim.max_nonfinite_steps=3"], 3,
     r"training stopped: worker rank \d: \d+ consecutive steps before step \d+ had a non-finite loss"),
], ids=["config", "divergence"])
def test_an_error_no_restart_can_fix_stops_the_ray_run_at_once(digits_root: Path, tmp_path: Path, extra: list[str],
                                                               status: int, message: str) -> None:
    log = tmp_path / "fatal.log"
    driver = start_training(overrides(digits_root, tmp_path, "fatal", "launch.max_failures=5", *extra), log)
    try:
        output = finish(driver, log)
    finally:
        driver.kill()
    assert driver.returncode == status, output[-5000:]
    assert re.search(message, output), output[-5000:]
    # The fault happened in a worker, which recorded it; training started once, not once per allowed restart.
    record = json.loads((tmp_path / "fatal" / "fatal_error.json").read_text())
    assert re.search(message.split(": ", 2)[-1], record["message"]) and record["kind"] in ("user", "diverged")
    assert output.count("run fatal: resnet18 on 2 x cpu") == 1, output[-5000:]
