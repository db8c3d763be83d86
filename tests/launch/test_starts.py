"""starts.jsonl: each start of a run, its resizes and the steps redone; and the refusal of relative output
paths inside a Ray job's temporary copy of the working directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs import ConfigError, load_config
from launch.orchestration import RAY_JOB_ENV, check_outputs_outlive_a_ray_job
from launch.orchestration.starts import read_starts, record_start, start_counts


def report(run_dir: Path, *steps: int) -> None:
    with (run_dir / "metrics.jsonl").open("a") as file:
        for step in steps:
            file.write(json.dumps({"step": step, "loss": 1.0}) + "\n")


def test_each_start_records_its_size_and_what_the_attempt_before_reached(tmp_path: Path) -> None:
    first = record_start(tmp_path, step=0, world_size=2)
    assert first.reached is None and first.cause is None and first.describe() == "start with 2 workers"
    report(tmp_path, 5, 10, 15)
    shrunk = record_start(tmp_path, step=10, world_size=1)  # a node was lost after step 15's report
    assert (shrunk.previous_world_size, shrunk.reached, shrunk.redone) == (2, 15, 5)
    assert shrunk.describe() == ("resize: 2 -> 1 workers at step 10 (shrank: fewer workers could be had after the "
                                 "last attempt ended); the attempt before reached step 15: 5 steps redone")
    report(tmp_path, 20)
    (tmp_path / "metrics.jsonl").write_text((tmp_path / "metrics.jsonl").read_text() + '{"step": 2')  # cut short
    same = record_start(tmp_path, step=20, world_size=1)
    assert same.cause is None and same.redone == 0 and same.describe() == "restart at step 20 with 1 workers"
    grown = record_start(tmp_path, step=20, world_size=2)
    assert grown.cause == "grew: more workers could be had"
    assert [s.world_size for s in read_starts(tmp_path)] == [2, 1, 1, 2]
    assert start_counts(tmp_path) == {"restarts": 3, "resizes": 2, "steps_redone": 5}


def test_a_ray_job_refuses_relative_outputs_that_would_land_in_its_temporary_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    relative = load_config("quickstart")
    absolute = load_config("quickstart", [f"launch.runs_dir={tmp_path}/runs", f"data.root={tmp_path}/digits"])
    check_outputs_outlive_a_ray_job(relative)  # outside a Ray job: relative paths are the user's own folder
    monkeypatch.chdir(tmp_path)
    # What Ray's job supervisor sets for an entrypoint submitted with --working-dir.
    monkeypatch.setenv(RAY_JOB_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"},
                                                "metadata": {}}))
    with pytest.raises(ConfigError, match=rf"Ray's temporary copy of the submitted working directory \({tmp_path}\)"
                                          r", and launch.runs_dir='runs', data.root='data/digits' would write there"):
        check_outputs_outlive_a_ray_job(relative)
    check_outputs_outlive_a_ray_job(absolute)
    with pytest.raises(ConfigError, match=r"tracking.uri='sqlite:///mlflow.db'"):
        check_outputs_outlive_a_ray_job(load_config("quickstart", [f"launch.runs_dir={tmp_path}",
                                                                   f"data.root={tmp_path}",
                                                                   "tracking.uri=sqlite:///mlflow.db"]))
    # A job submitted without a working directory runs where its entrypoint says: nothing to refuse.
    monkeypatch.setenv(RAY_JOB_ENV, json.dumps({"runtime_env": {}, "metadata": {}}))
    check_outputs_outlive_a_ray_job(relative)


def test_a_torn_last_start_line_is_skipped_and_later_starts_still_record(tmp_path: Path) -> None:
    record_start(tmp_path, step=0, world_size=2)
    record_start(tmp_path, step=10, world_size=1)
    starts_file = tmp_path / "starts.jsonl"
    starts_file.write_text(starts_file.read_text()[:-25])  # the node was lost while it appended the second
    assert [s.world_size for s in read_starts(tmp_path)] == [2]
    again = record_start(tmp_path, step=10, world_size=1)
    assert again.cause == "shrank: fewer workers could be had after the last attempt ended"
    assert [(s.step, s.world_size, s.cause) for s in read_starts(tmp_path)] == [(0, 2, None), (10, 1, again.cause)]
    # The cause is what was written, not recomputed on reading.
    assert json.loads(starts_file.read_text().splitlines()[-1])["cause"] == again.cause
