"""`python -m launch bench step` and `bench data`: every variant runs and the ratios are theirs."""

from __future__ import annotations

import json
import statistics

import pytest

from launch.cli import main

TINY = ["model.name=resnet18", "data.image_size=16", "data.batch_size=4"]


def test_bench_step_json_line_holds_both_variants_and_their_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "step", "--steps", "2", "--rounds", "2", "--json", *TINY]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert (record["model"], record["image_size"], record["batch_size"], record["precision"]) == (
        "resnet18", 16, 4, "fp32")
    assert len(record["bare_images_per_s"]) == len(record["engine_images_per_s"]) == 2
    assert all(v > 0 for v in record["bare_images_per_s"] + record["engine_images_per_s"])
    assert record["engine_over_bare"] == pytest.approx(
        statistics.median(record["engine_images_per_s"]) / statistics.median(record["bare_images_per_s"]))


def test_bench_step_table_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "step", "--steps", "1", "--rounds", "1", *TINY]) == 0
    out = capsys.readouterr().out
    assert "bare" in out and "engine" in out and "engine / bare:" in out
    assert main(["bench", "step", "--steps", "0"]) == 2
    assert "--steps=0" in capsys.readouterr().err


def test_bench_data_times_both_loaders_on_the_same_generated_jpegs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "data", "--images", "16", "--batch-size", "4", "--image-size", "32", "--rounds", "2",
                 "--num-workers", "1", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert record["num_images"] == 16 and record["source"].startswith("generated 500x375 q90")
    assert set(record["images_per_s"]) == {"torch", "dali-cpu"}
    assert all(len(values) == 2 and min(values) > 0 for values in record["images_per_s"].values())
    assert record["over_torch"]["dali-cpu"] == pytest.approx(
        statistics.median(record["images_per_s"]["dali-cpu"]) / statistics.median(record["images_per_s"]["torch"]))
    assert main(["bench", "data", "--rounds", "0"]) == 2
