"""`python -m launch bench step`, `bench data` and `bench train`: every variant runs and the ratios are theirs."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

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
    assert record["engine_over_bare"] == pytest.approx(statistics.median(
        [e / b for e, b in zip(record["engine_images_per_s"], record["bare_images_per_s"], strict=True)]))


def test_bench_step_table_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "step", "--steps", "1", "--rounds", "1", *TINY]) == 0
    out = capsys.readouterr().out
    assert "bare" in out and "engine" in out and "engine / bare:" in out
    assert main(["bench", "step", "--steps", "0"]) == 2
    assert "--steps=0" in capsys.readouterr().err


def test_bench_data_times_both_loaders_and_the_streaming_sources_on_the_same_generated_jpegs(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "data", "--images", "16", "--batch-size", "4", "--image-size", "32", "--rounds", "2",
                 "--num-workers", "1", "--json", "--streaming"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    record, streaming = json.loads(lines[0]), json.loads(lines[1])
    assert record["num_images"] == 16 and record["source"].startswith("generated 500x375 q90")
    variants = {"torch", "dali-cpu", "dali-cpu-inline"}
    assert set(record["images_per_s"]) == set(record["loader_cpu_ms_per_batch"]) == variants
    for timings in (record["images_per_s"], record["loader_cpu_ms_per_batch"], record["loader_wall_ms_per_batch"]):
        assert all(len(values) == 2 and min(values) > 0 for values in timings.values())
    assert record["reader_threads"] == 2
    assert record["over_torch"]["dali-cpu"] == pytest.approx(statistics.median(
        [d / t for d, t in zip(record["images_per_s"]["dali-cpu"], record["images_per_s"]["torch"], strict=True)]))
    assert main(["bench", "data", "--rounds", "0"]) == 2
    # The same files from a folder, local shards and a local S3 server: a cold cache fetches the whole set every
    # epoch, a warm one that holds it fetches nothing.
    assert set(streaming["images_per_s"]) == {"folder", "shards-local", "s3-cold", "s3-warm-100%", "s3-50%", "s3-25%"}
    assert all(len(values) == 2 and min(values) > 0 for values in streaming["images_per_s"].values())
    assert streaming["num_shards"] == 16 and streaming["fetched_bytes"]["s3-warm-100%"] == [0, 0]
    assert streaming["fetched_bytes"]["s3-cold"] == [streaming["set_bytes"]] * 2


def test_bench_train_reports_the_runs_own_throughput(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      digits_root: Path) -> None:
    from launch.bench.train import TrainBench, peak_tflops

    assert main(["bench", "train", "--json", "launch.launcher=torchrun", f"launch.runs_dir={tmp_path}",
                 f"data.root={digits_root}", "launch.name=b", "schedule.epochs=1", "data.image_size=8",
                 "data.batch_size=64"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert record["images_per_s"] == summary["images_per_s"] > 0 and record["world_size"] == 1
    assert record["steps"] == summary["steps"] == 22 and record["training_gflops_per_image"] > 0
    assert record["mfu"] is None and record["device"] == "cpu"  # no peak to compare with on a CPU
    assert json.loads((tmp_path / "b" / "bench.json").read_text()) == record
    assert not (tmp_path / "mlflow.db").exists()  # a benchmark is not tracked

    # MFU on a GPU of the table: achieved FLOP/s per device over the dense bf16 peak.
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0 and peak_tflops("NVIDIA H100 PCIe", "fp32") is None
    on_gpus = TrainBench(config="x", model="resnet50", image_size=224, device="NVIDIA H100 80GB HBM3",
                         world_size=8, precision="bf16", epochs=1, steps=1, images_per_s=8 * 3000.0,
                         training_gflops_per_image=24.6, peak_tflops_per_device=989.4, run_dir="-")
    assert on_gpus.mfu == pytest.approx(3000 * 24.6e9 / 989.4e12)
    assert "MFU" in on_gpus.table() and f"{100 * on_gpus.mfu:.1f}%" in on_gpus.table()


def test_bench_gpu_runs_its_tiny_configuration_on_a_cpu_and_says_what_it_skipped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from launch.bench.gpu import GpuBenchSettings, run_config
    from launch.bench.gpu_dali import dali_variants

    if torch.cuda.is_available():
        pytest.skip("this test runs the CPU configuration; tests/gpu runs the GPU one")
    assert main(["bench", "gpu", "--out", str(tmp_path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {row["name"]: row for row in record["rows"]}
    compiled = ["bare step, synthetic, compiled", "bare step, synthetic, compiled reduce-overhead",
                "engine, synthetic, compiled", "engine + DALI, compiled"]
    # The configured DALI settings, then each variant that differs from them (hw_decoder_load 0.65 does not).
    variants = list(dali_variants(run_config(GpuBenchSettings.tiny(), "data.loader=dali").data))
    assert "hw_decoder_load 0.65" not in variants and {"threads 8", "full decode + slice"} <= set(variants)
    dali = ["DALI alone, configured (decode ceiling)", *(f"DALI alone, {variant}" for variant in variants[1:])]
    measured = ["bare step, synthetic (compute ceiling)", "engine, synthetic", *dali, "engine + DALI",
                "engine + DataLoader (1 worker)"]
    assert set(measured + compiled) | {"DALI mixed decoder"} <= set(rows)
    for name in measured:
        rates = rows[name]["images_per_s"]
        assert len(rates) == 2 and min(rates) > 0 and not rows[name]["skipped"], name
    for name in compiled:
        assert rows[name]["skipped"].startswith("torch.compile rows run on GPUs only"), name
    assert 0 <= rows["engine + DataLoader (1 worker)"]["data_wait_share"] < 1
    assert rows["DALI mixed decoder"]["skipped"].startswith("needs a GPU")
    # The engine's first step is timed apart; the DALI rows note their reader threads' CPU time per batch.
    assert re.fullmatch(r"first step [\d.]+ s", rows["engine + DALI"]["notes"])
    assert all(re.fullmatch(r"reader CPU [\d.]+ ms/batch", rows[name]["notes"]) for name in dali)
    # The fastest DALI variant also feeds the engine, unless it is the configured one.
    fastest = max(dali, key=lambda name: statistics.median(rows[name]["images_per_s"]))
    variant = fastest.removeprefix("DALI alone, ")
    assert (f"engine + DALI, {variant}" in rows) == (fastest != dali[0])
    assert record["machine"]["torch"] == torch.__version__ and record["settings"]["model"] == "resnet18"
    assert json.loads((tmp_path / "bench_gpu.json").read_text()) == record
    assert "| engine + DALI, compiled | skipped: torch.compile" in (tmp_path / "bench_gpu.md").read_text()


def test_bench_gpu_mfu_is_training_flops_over_the_peak() -> None:
    from launch.bench.gpu import GpuBenchSettings, with_mfu
    from launch.bench.gpu_watch import Row
    from trainer.models import resnet50
    from trainer.models.flops import training_flops_per_image

    settings = GpuBenchSettings()
    row = with_mfu(Row("engine, synthetic", [3000.0, 3100.0, 2900.0]), settings, "NVIDIA H200")
    assert row.mfu == pytest.approx(3000 * training_flops_per_image(resnet50(), 224) / 989.4e12)
    assert with_mfu(Row("DALI mixed alone (decode ceiling)", [9000.0]), settings, "NVIDIA H200").mfu is None
    assert with_mfu(Row("engine, synthetic", [3000.0]), settings, "cpu").mfu is None


def test_the_median_interval_follows_the_binomial_order_statistics() -> None:
    from launch.bench import median_interval, trusted

    values = [float(v) for v in range(1, 16)]  # 15 rounds: the 4th and the 12th value bound the median
    assert median_interval(values) == (4.0, 12.0)
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few rounds for more than min and max
    assert trusted([100.0 + i % 3 for i in range(15)])  # 100-102 around a median of 101
    assert not trusted([100.0, 130.0, 80.0, 120.0, 90.0, 110.0, 70.0])  # negative control: a busy machine


def test_bench_accuracy_times_each_variant_to_the_target_and_says_which_never_reached_it(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, digits_root: Path) -> None:
    common = ["launch.launcher=torchrun", f"launch.runs_dir={tmp_path}", f"data.root={digits_root}",
              "schedule.epochs=2", "data.image_size=8", "data.batch_size=64"]
    assert main(["bench", "accuracy", "--target", "0.5", "--json", "--variant", "recipe=",
                 "--variant", "frozen=optim.lr=1e-6,schedule.warmup_epochs=0", *common]) == 0
    recipe, frozen = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:])
    summary = json.loads((Path(recipe["run_dir"]) / "summary.json").read_text())
    assert recipe["variant"] == "recipe" and recipe["overrides"] == []
    assert recipe["time_to_target_s"] == summary["time_to_accuracy"]["0.5"]["elapsed_s"] > 0
    assert recipe["final_top1"] >= 0.5 and summary["stopped_at_target"] == (recipe["epoch"] == 0)
    # A learning rate of 1e-6 leaves the network at chance (10%): the target is never reached.
    assert frozen["time_to_target_s"] is None and frozen["final_top1"] < 0.5
    assert not (tmp_path / "mlflow.db").exists()  # benchmarks are not tracked

    from launch.bench.accuracy import AccuracyRow, table

    rows = [AccuracyRow(variant=name, overrides=(), target=0.98, time_to_target_s=seconds, epoch=epoch,
                        final_top1=0.981, images_per_s=100.0, wall_time_s=60.0, run_dir="-")
            for name, seconds, epoch in (("a", 100.0, 7), ("b", 50.0, 5), ("c", None, None))]
    report = table(rows, config="quickstart", machine="cpu")
    assert "| b | 50.0 s | 5 | 0.50 |" in report and "| c | not reached | - | - |" in report
    assert main(["bench", "accuracy", "--variant", "no-equals-sign"]) == 2


def test_bench_infer_times_three_runtimes_at_each_batch_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "infer", "--batch-sizes", "1,3", "--iterations", "3", "--warmup", "1", "--json",
                 "data.image_size=16"]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert (record["model"], record["image_size"], record["iterations"]) == ("resnet18", 16, 3)
    assert [(row["batch_size"], row["runtime"]) for row in record["rows"]] == [
        (1, "eager"), (1, "torch.export"), (1, "onnxruntime"), (3, "eager"), (3, "torch.export"), (3, "onnxruntime")]
    for row in record["rows"]:
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        # Throughput is images over the summed time of the timed calls, so it lies between the fastest and the
        # slowest call's rate (p99 over 3 calls is near the slowest; the median is at most that).
        assert row["batch_size"] * 1000 / row["p99_ms"] * 0.9 <= row["images_per_s"]
    assert main(["bench", "infer", "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes='1,x'" in capsys.readouterr().err


def test_bench_elastic_reports_each_resize_with_its_settings() -> None:
    # Measuring needs a two-node Ray cluster and a whole elastic run (minutes): tests/launch/test_ray.py runs
    # that scenario and checks its outcome; here the report is checked on given numbers.
    from launch.bench.elastic import ElasticBench, ResizeCost

    bench = ElasticBench(resize_interval_s=5, group_start_timeout_s=60, rows=[
        ResizeCost(event="shrink (node removed)", old_world_size=2, new_world_size=1, seconds_to_resumed_step=71.25,
                   steps_redone=1),
        ResizeCost(event="grow (node added)", old_world_size=1, new_world_size=2, seconds_to_resumed_step=12.5,
                   steps_redone=3)])
    lines = bench.table().splitlines()
    assert "launch.resize_interval_s=5, launch.group_start_timeout_s=60" in lines[0]
    assert lines[2].split() == ["shrink", "(node", "removed)", "2", "->", "1", "71.2", "1"]
    assert lines[3].split() == ["grow", "(node", "added)", "1", "->", "2", "12.5", "3"]
    assert json.loads(bench.as_json())["rows"][1]["seconds_to_resumed_step"] == 12.5


def test_a_failing_bench_gpu_row_is_recorded_and_the_others_still_run(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import launch.bench.gpu as gpu

    original = gpu.dali_alone_row

    def broken_padding(name: str, cfg: object, *args: object, **kwargs: object) -> object:
        if "padding" in name:
            raise RuntimeError("[/opt/dali/decoder.cc:42] Assert on \"padding\" failed\nsecond line")
        return original(name, cfg, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gpu, "dali_alone_row", broken_padding)
    logged: list[str] = []
    result = gpu.bench_gpu(tmp_path, log=logged.append)
    rows = {row.name: row for row in result.rows}
    failed = rows["DALI alone, memory padding 256 MB"]
    assert failed.skipped == 'failed: RuntimeError: [/opt/dali/decoder.cc:42] Assert on "padding" failed'
    assert any("Traceback" in line and "broken_padding" in line for line in logged)  # the traceback is logged
    # The rows after it ran, and the saved report holds the failure.
    assert rows["DALI alone, full decode + slice"].images_per_s and rows["engine + DataLoader (1 worker)"].images_per_s
    assert "failed: RuntimeError" in (tmp_path / "bench_gpu.md").read_text()


def test_every_built_in_accuracy_variant_is_a_valid_quickstart_config() -> None:
    from configs import load_config
    from launch.bench.accuracy import VARIANT_SETS

    for variants in VARIANT_SETS.values():
        for name, overrides in variants.items():
            assert load_config("quickstart", list(overrides)), name
    assert load_config("quickstart", list(VARIANT_SETS["levers"]["stochastic depth 0.05"])).model.drop_path_rate == 0.05
