"""A process killed (SIGKILL) in the middle of writing a checkpoint: the previous one stays the latest and
the run resumes from it to the weights of an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.launch.test_preemption import REPO, train_command
from trainer.checkpoint import open_checkpoints
from trainer.state import from_bytes

# Runs `python -m launch` with one change: when the model file of step 10 is written, half of it lands in
# place (as on a store without atomic rename) and the process is killed on the spot.
KILLED_WHILE_WRITING = """
import os, signal, sys
from data_pipeline.storage import FsspecStorage
write_bytes = FsspecStorage.write_bytes
def torn(self, path, data):
    if path.endswith("step_000000010/model.pt"):
        with open(f"{self.root}/{path}", "wb") as file:
            file.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    write_bytes(self, path, data)
FsspecStorage.write_bytes = torn
from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def final_model(checkpoints: Path) -> dict[str, torch.Tensor]:
    manager = open_checkpoints(str(checkpoints), keep_last=1)
    manifest = manager.latest()
    assert manifest is not None and manifest.step == 22
    return from_bytes(manager.read(22, "model.pt"))


def test_sigkill_mid_write_keeps_the_previous_checkpoint_and_the_run_resumes_exactly(
        digits_root: Path, tmp_path: Path) -> None:
    # 22 steps. Tracking is off: this test is about checkpoints, and a SIGKILL that lands while MLflow is still
    # creating the embedded store's tables leaves that store unusable, which a later run reports with exit
    # status 6 (seen in CI), not what this test examines.
    extra = ["data.batch_size=64", "checkpoint.interval_steps=5", "checkpoint.keep_last=2", "tracking.enabled=false"]
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING,
                             *train_command(digits_root, tmp_path, "killed", *extra)[3:]],
                            cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoints = tmp_path / "killed" / "checkpoints"
    manager = open_checkpoints(str(checkpoints), keep_last=2)
    torn = checkpoints / "step_000000010"
    assert (torn / "model.pt").exists() and not (torn / "manifest.json").exists()
    latest = manager.latest()
    assert latest is not None and latest.step == 5

    resumed = subprocess.run(train_command(digits_root, tmp_path, "resumed", f"checkpoint.url={checkpoints}", *extra),
                             cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run(train_command(digits_root, tmp_path, "whole", *extra), cwd=REPO, capture_output=True,
                           text=True, check=False, timeout=300)
    assert whole.returncode == 0, whole.stderr
    a, b = final_model(checkpoints), final_model(tmp_path / "whole" / "checkpoints")
    assert all(torch.equal(a[k], b[k]) for k in a)
