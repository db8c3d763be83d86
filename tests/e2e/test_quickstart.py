"""The quickstart as a user runs it: `python -m launch train` on the embedded defaults, in a fresh process
(2 Ray workers on a local Ray cluster)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_trains_saves_its_config_and_prints_accuracy(tmp_path: Path, digits_root: Path) -> None:
    overrides = [f"launch.runs_dir={tmp_path / 'runs'}", f"data.root={digits_root}", "launch.name=qs"]
    result = subprocess.run([sys.executable, "-m", "launch", "train", *overrides], cwd=REPO,
                            capture_output=True, text=True, check=False, timeout=900)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "images_per_s" in out and "eta" in out and "val top-1" in out

    run_dir = tmp_path / "runs" / "qs"
    checkpoints = run_dir / "checkpoints"
    resolved = load_config("quickstart", [*overrides, f"checkpoint.url={checkpoints}"])
    assert load_config(run_dir / "config.yaml") == resolved
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["val_images"] == 355
    assert summary["images_per_s"] > 0
    assert summary["checkpoint_url"] == str(checkpoints / "step_000000090")
    assert sorted(p.name for p in Path(summary["checkpoint_url"]).iterdir()) == [
        "manifest.json", "model.pt", "rank_0.pt", "rank_1.pt", "train_state.pt"]
    # One epoch of ResNet-18 on digits; chance is 10%.
    assert summary["val_top1"] > 0.3
    assert f"{100 * summary['val_top1']:.2f}%" in out
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == list(range(10, 91, 10))
    assert lines[-1]["step"] == 90 and lines[-1]["val_top1"] == summary["val_top1"]
