"""`torchrun -m launch train`: two real processes, one run folder, DDP over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multiproc import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multiproc
def test_torchrun_trains_one_run_with_two_ranks(digits_root: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "launch", "train",
               "--launcher", "torchrun", f"data.root={digits_root}", "data.image_size=8", "data.batch_size=16",
               "data.dali_threads=1", "data.loader_workers=0", "schedule.epochs=1", "tracking.register=false",
               "distributed.strategy=ddp",
               f"launch.runs_dir={tmp_path}", "tracking.log_interval_steps=15"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p.parent for p in tmp_path.glob("*/config.yaml")]  # rank 0 made the only run; rank 1 used its name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 1442 // 32 == 45 and summary["val_images"] == 355
    assert summary["images_per_s"] > 0
    reports = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports if "loss" in r] == [15, 30, 45]  # written by rank 0 alone
    assert result.stdout.count("val top-1") == 1
