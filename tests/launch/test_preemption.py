"""SIGTERM: the run finishes its step, commits a checkpoint a step or two later, exits 75, and resumes from it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from launch.errors import exit_status_of
from trainer.preempt import Preempted

REPO = Path(__file__).resolve().parents[2]


def train_command(digits_root: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "launch", "train", "--launcher", "torchrun", f"data.root={digits_root}",
            "data.image_size=8", "data.batch_size=16", "launch.num_workers=1", "distributed.strategy=none",

            "data.dali_threads=1", "data.loader_workers=0",
            "schedule.epochs=1", "tracking.log_interval_steps=5", "tracking.register=false",
            f"launch.runs_dir={runs}", f"launch.name={name}",
            *extra]


def test_sigterm_checkpoints_exits_75_and_the_run_resumes(digits_root: Path, tmp_path: Path) -> None:
    process = subprocess.Popen(train_command(digits_root, tmp_path, "first"), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("step 5 ("):
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == exit_status_of(Preempted()).status == 75, stderr
    # Stopped a step or two after the signal came (between reports), after a checkpoint there.
    checkpoints = tmp_path / "first" / "checkpoints"
    committed = sorted(p.name for p in checkpoints.iterdir() if (p / "manifest.json").exists())
    assert len(committed) == 1
    step = int(committed[0][5:])
    assert 5 < step < 90
    assert re.search(rf"preempted: stopped on SIGTERM at step {step}, checkpoint committed \d+\.\d s after this "
                     rf"process's SIGTERM \(within launch.preempt_grace_s=30\); resume from "
                     rf"{re.escape(str(checkpoints / committed[0]))}", stderr), stderr

    resumed = subprocess.run(train_command(digits_root, tmp_path, "second", f"checkpoint.url={checkpoints}"),
                             cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert summary["steps"] == 90 and summary["val_images"] == 355
    assert summary["checkpoint_url"] == str(checkpoints / "step_000000090")
