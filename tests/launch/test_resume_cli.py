"""`train --resume` in each of its forms, the refusal of a run name that is taken, and one writer per checkpoint
URL (a second live run refused, a dead holder taken over)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import main
from trainer.checkpoint import open_checkpoints

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def args(root: Path, runs: Path, *extra: str) -> list[str]:
    # 22 steps of 64 per epoch at 8 px; no tracking: these tests are about run folders and checkpoints.
    return ["train", "--launcher", "torchrun", f"data.root={root}", "data.image_size=8", "data.batch_size=64",

            "data.dali_threads=1", "data.loader_workers=0",
            "schedule.epochs=1", "tracking.enabled=false", "tracking.register=false",
            "tracking.log_interval_steps=11", f"launch.runs_dir={runs}", *extra]


def steps_of(run_dir: Path) -> list[int]:
    return [m.step for m in open_checkpoints(str(run_dir / "checkpoints"), keep_last=1).committed()]


def test_every_form_of_resume_continues_where_it_should(digits_root: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    assert main(args(digits_root, runs, "launch.name=first")) == 0
    assert steps_of(runs / "first")[-1] == 22

    # A taken name is refused, and the run folder is left as it was.
    before = sorted(p.name for p in (runs / "first").iterdir())
    capsys.readouterr()
    assert main(args(digits_root, runs, "launch.name=first")) == 2
    assert "run folder" in (err := capsys.readouterr().err) and "already exists" in err and "--resume first" in err
    assert sorted(p.name for p in (runs / "first").iterdir()) == before

    # --resume latest: the newest run, one more epoch from its last step.
    assert main(["train", "--resume", "latest", f"launch.runs_dir={runs}", "schedule.epochs=2"]) == 0
    assert "resuming from step 22" in capsys.readouterr().out and steps_of(runs / "first")[-1] == 44

    # --resume <run folder path>: the same run, by its folder.
    assert main(["train", "--resume", str(runs / "first"), f"launch.runs_dir={runs}", "schedule.epochs=3"]) == 0
    assert "resuming from step 44" in capsys.readouterr().out and steps_of(runs / "first")[-1] == 66

    # --resume <checkpoint URL>: a new run (its own folder) that starts from those checkpoints and writes there.
    url = f"file://{runs / 'first' / 'checkpoints'}"
    assert main([*args(digits_root, runs, "launch.name=second", "schedule.epochs=4"), "--resume", url]) == 0
    assert "resuming from step 66" in capsys.readouterr().out
    summary = json.loads((runs / "second" / "summary.json").read_text())
    assert summary["steps"] == 88 and summary["checkpoint_url"] == f"{url}/step_000000088"
    assert steps_of(runs / "first")[-1] == 88 and not (runs / "second" / "checkpoints").exists()

    # Negative control: a URL with no committed checkpoint is not silently a fresh start.
    assert main([*args(digits_root, runs, "launch.name=third"), "--resume", str(tmp_path / "nothing")]) == 2
    assert "no committed checkpoint there" in capsys.readouterr().err


def test_a_second_run_on_a_live_runs_checkpoints_is_refused_and_takes_over_once_it_is_gone(
        digits_root: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    url = str(runs / "first" / "checkpoints")
    first = subprocess.Popen([sys.executable, "-m", "launch", *args(digits_root, runs, "launch.name=first",
                                                                     "schedule.epochs=50")],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not steps_of(runs / "first"):  # training, with its first checkpoint committed
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "launch", *args(digits_root, runs, "launch.name=second"),
                                 "--resume", url], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
        assert f"{url} is being written by run 'first' (launch " in second.stderr
        assert f"pid {first.pid}, last heartbeat" in second.stderr
        assert first.poll() is None  # the holder trained on, untouched
        first.kill()  # then dies holding the URL: its record stays behind
        assert first.wait() == -9
    finally:
        first.kill()
    assert len(list((runs / "first" / "checkpoints" / "writers").iterdir())) == 1
    third = subprocess.run([sys.executable, "-m", "launch", *args(digits_root, runs, "launch.name=third"),
                            "--resume", url], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "taking over from run 'first' (launch " in third.stdout and f"pid {first.pid}," in third.stdout
    assert not list((runs / "first" / "checkpoints" / "writers").iterdir())  # released at the end
