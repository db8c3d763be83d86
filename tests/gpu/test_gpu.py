"""What only a GPU can check: DALI's mixed decoder against its CPU pipeline, a bf16 channels-last ResNet-50
step, nccl DDP with checkpoint and resume, `bench gpu` and `train` each started in a fresh process (as a user
starts them: an order-dependent CUDA call fails there, not only after other tests warmed the device up), and
the whole product path: Ray places a worker on the GPU, DALI mixed feeds it, MLflow records GPU system
metrics, the worker is killed and resumes. `pytest -m gpu` runs them (about 5 minutes on one H200); without
a GPU they are skipped, with the reason printed (-ra). On a GPU machine without DALI, Ray or MLflow they fail
with the line that installs the extra, not skip: validating a node means running all of them."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer
from configs import load_config
from configs.schema import DataConfig
from tests.multiproc import CrashAt, Interrupt, free_port
from trainer.checkpoint import open_checkpoints
from trainer.dist import single_process_context

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

REPO = Path(__file__).resolve().parents[2]


def require(module: str) -> None:
    """Fail (not skip) when an extra a GPU node needs is missing, with the line that installs it."""
    from configs.extras import import_extra

    try:
        importlib.import_module(module)
    except ImportError:
        import_extra(module)  # raises MissingExtraError: "install the extra 'dali': pip install ..."


def launch(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m launch ARGS` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def test_dali_mixed_decoding_matches_the_cpu_pipeline(digits_root: Path) -> None:
    require("nvidia.dali")
    from data_pipeline import build_loaders

    cfg = DataConfig(dataset="folder", root=str(digits_root), batch_size=32, dali_threads=2, image_size=32,
                     loader="dali")
    gpu = single_process_context().device
    for split in ("train", "val"):
        mixed = list(getattr(build_loaders(cfg, seed=0, device=gpu, dtype=torch.float16), split).iter_epoch(0))
        cpu = list(getattr(build_loaders(cfg, seed=0, dtype=torch.float16), split).iter_epoch(0))
        assert len(mixed) == len(cpu) > 0
        for (images, labels), (reference, reference_labels) in zip(mixed, cpu, strict=True):
            assert images.device == gpu and images.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(labels, reference_labels)
            # nvJPEG and libjpeg-turbo round their IDCTs differently: per image, well under 2 grey levels
            # on average (1/255/0.229 = 0.017 normalised per level).
            per_image = (images.float().cpu() - reference.float()).abs().flatten(1).mean(dim=1)
            assert per_image.max() < 0.035, split


def test_every_dali_setting_delivers_the_same_images(digits_root: Path) -> None:
    """The settings bench gpu varies change speed only: the hardware decoder's share, prefetch depth, padding,
    and full decode + slice against ROI decode all deliver the configured pipeline's images."""
    require("nvidia.dali")
    from data_pipeline import build_loaders

    base = DataConfig(dataset="folder", root=str(digits_root), batch_size=32, dali_threads=2, image_size=32,
                      loader="dali")
    gpu = single_process_context().device

    def first_batches(cfg: DataConfig) -> torch.Tensor:
        epoch = build_loaders(cfg, seed=0, device=gpu, dtype=torch.float16).train.iter_epoch(0, start_batch=3)
        return torch.cat([next(epoch)[0] for _ in range(3)]).float()

    reference = first_batches(base)
    for changes in ({"dali_hw_decoder_load": 0.99}, {"dali_prefetch_depth": 5}, {"dali_memory_padding_mb": 256},
                    {"dali_decode": "full"}):
        images = first_batches(dataclasses.replace(base, **changes))  # type: ignore[arg-type]
        # The hardware decoder and nvJPEG's CUDA decoder may round their IDCTs differently: under 2 grey levels.
        assert (images - reference).abs().mean() < 0.035, changes
    # Negative control: other crops of the same files differ by far more.
    other = build_loaders(base, seed=1, device=gpu, dtype=torch.float16).train.iter_epoch(0, start_batch=3)
    assert (torch.cat([next(other)[0] for _ in range(3)]).float() - reference).abs().mean() > 0.2


def test_bf16_channels_last_resnet50_steps(tmp_path: Path) -> None:
    cfg = load_config("resnet50-synthetic-bench-1gpu", [
        "data.batch_size=32", "data.synthetic_images=256", "data.synthetic_classes=1000", "schedule.epochs=1",
        "tracking.log_interval_steps=2", "precision.dtype=bf16", "precision.channels_last=true",
        "precision.compile=false"])
    reports: list[dict[str, float]] = []

    class Keep:
        def log(self, metrics: dict[str, float], step: int) -> None:
            reports.append(metrics)

        def on_checkpoint(self, step: int, url: str) -> None:
            pass

    result = trainer.run(cfg, single_process_context(), [Keep()])
    losses = [r["loss"] for r in reports if "loss" in r]
    assert result.steps == 8 and len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(r["nonfinite_losses"] for r in reports if "loss" in r) == 0


def test_nccl_ddp_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    from trainer.dist import init_distributed
    from trainer.models import resnet18
    from trainer.strategy.ddp import DDPStrategy

    ctx = init_distributed(rank=0, local_rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        assert torch.distributed.get_backend() == "nccl"
        # The DDP wrapper itself on the GPU (trainer.run uses the single strategy for one process).
        model = resnet18(num_classes=10).to(ctx.device, memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        strategy = DDPStrategy(model, optimizer, torch.amp.GradScaler("cuda"),
                               load_config("quickstart").distributed, ctx)
        images = torch.randn(8, 3, 64, 64, device=ctx.device).to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(strategy.model(images), torch.zeros(8, dtype=torch.long,
                                                                                         device=ctx.device))
        strategy.backward(loss)
        strategy.step()
        # A whole run in the nccl group, compiled (the GPU default): crash after a checkpoint, resume to the end.
        cfg = load_config("quickstart", [
            "data.dataset=synthetic", "data.synthetic_images=512", "data.synthetic_classes=10",
            "data.image_size=32", "data.batch_size=32", "schedule.epochs=2", "distributed.strategy=ddp",
            "tracking.log_interval_steps=4", "checkpoint.interval_steps=12", f"checkpoint.url={tmp_path}"])
        with pytest.raises(Interrupt):
            trainer.run(cfg, ctx, [CrashAt(20)])
        assert open_checkpoints(str(tmp_path)).latest().step == 16  # type: ignore[union-attr]
        resumed = trainer.run(cfg, ctx, [])
        assert resumed.start_step == 16 and resumed.steps == 32 and resumed.val["val_images"] == 32
        # Compiled, the checkpoint still holds torchvision's names.
        weights = open_checkpoints(str(tmp_path)).read(32, "model.pt")
        from trainer.serialize import from_bytes

        assert not any(key.startswith("_orig_mod") for key in from_bytes(weights))
    finally:
        torch.distributed.destroy_process_group()


def test_bench_gpu_in_a_fresh_process(tmp_path: Path) -> None:
    require("nvidia.dali")
    done = launch("bench", "gpu", "--out", str(tmp_path), "--model", "resnet18", "--batch-size", "64", "--steps", "5",
                  "--rounds", "2", "--images", "1536", "--compile-modes", "default", "--json")
    assert done.returncode == 0, done.stderr[-5000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {row["name"]: row for row in record["rows"]}
    assert not [name for name, row in rows.items() if row["skipped"]]
    assert all(len(row["images_per_s"]) == 2 and min(row["images_per_s"]) > 0 for row in rows.values())
    for name in ("engine + DALI, compiled", "DALI alone, configured (decode ceiling)", "engine, synthetic, compiled"):
        assert rows[name]["peak_memory_gb"] > 0, name
    # NVML (nvidia-ml-py) answered inside the timed rounds: a busy GPU reads above zero.
    assert rows["bare step, synthetic (compute ceiling)"]["gpu_utilisation"] > 0
    assert "first step" in rows["engine + DALI, compiled"]["notes"]
    assert "reader CPU" in rows["DALI alone, configured (decode ceiling)"]["notes"]
    assert {"DALI alone, hw_decoder_load 0.99", "DALI alone, full decode + slice"} <= set(rows)
    assert json.loads((tmp_path / "bench_gpu.json").read_text()) == record


def test_train_in_a_fresh_process_compiles_on_the_gpu_is_killed_and_resumes(tmp_path: Path) -> None:
    require("nvidia.dali")
    from launch.bench.data import write_photo_like_jpegs
    from data_pipeline.prepare import prepare_index
    from tests.launch.test_ray import wait_for_report

    write_photo_like_jpegs(tmp_path / "data", num_images=640, num_classes=4, num_processes=os.cpu_count() or 1)
    prepare_index(str(tmp_path / "data"))
    runs = tmp_path / "runs"
    # 2 epochs of 20 steps of 32 images at 64 px through DALI mixed, compiled (auto: on for GPUs), this process.
    args = ["--config", "quickstart", f"data.root={tmp_path / 'data'}", "data.dataset=folder", "model.num_classes=4",
            "model.small_input=false", "data.image_size=64", "data.batch_size=32", "schedule.epochs=2",
            "launch.launcher=torchrun", "distributed.strategy=none", "tracking.enabled=false",
            "tracking.register=false", "tracking.promote_alias=null", f"launch.runs_dir={runs}", "launch.name=gpu",
            "tracking.log_interval_steps=5", "checkpoint.interval_steps=10"]
    log = tmp_path / "first.log"
    with log.open("wb") as output:
        first = subprocess.Popen([sys.executable, "-m", "launch", "train", *args], cwd=REPO, stdout=output,
                                 stderr=subprocess.STDOUT)
    try:
        wait_for_report(runs / "gpu" / "metrics.jsonl", after_step=10, timeout_s=400)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.kill()
    output = log.read_text(errors="replace")
    assert first.returncode == -signal.SIGKILL, output[-5000:]  # killed mid-run, not finished
    assert re.search(r"first step \(compile, warm-up\) [\d.]+ s", output), output[-3000:]
    resumed = launch("train", "--resume", "gpu", f"launch.runs_dir={runs}")
    assert resumed.returncode == 0, resumed.stderr[-5000:] + resumed.stdout[-5000:]
    assert re.search(r"resuming from step (10|20|30)\b", resumed.stdout), resumed.stdout[-3000:]
    summary = json.loads((runs / "gpu" / "summary.json").read_text())
    assert summary["device"] == "cuda" and summary["steps"] == 40 and summary["images_per_s"] > 0


def test_the_product_path_ray_worker_on_its_gpu_dali_mixed_mlflow_gpu_metrics_kill_and_resume(tmp_path: Path) -> None:
    for module in ("nvidia.dali", "ray", "mlflow", "pynvml"):
        require(module)
    from launch.bench.data import write_photo_like_jpegs
    from data_pipeline.prepare import prepare_index
    from tests.launch.test_ray import train_workers, wait_for_report

    write_photo_like_jpegs(tmp_path / "data", num_images=1600, num_classes=8, num_processes=os.cpu_count() or 1)
    prepare_index(str(tmp_path / "data"))
    runs = tmp_path / "runs"
    log = tmp_path / "train.log"
    # 2 epochs of 50 steps of 32 ResNet-18 images at 96 px, a checkpoint every 20 steps; MLflow in runs/mlflow.db.
    args = ["--config", "quickstart", f"data.root={tmp_path / 'data'}", "data.dataset=folder", "model.name=resnet18",
            "model.num_classes=8", "model.small_input=false", "data.image_size=96", "data.batch_size=32",
            "data.num_workers=4", "schedule.epochs=2", "launch.num_workers=1", "launch.gpus_per_worker=1",
            "launch.cpus_per_worker=4", "distributed.strategy=ddp", "launch.max_failures=2",
            "checkpoint.interval_steps=20", "tracking.log_interval_steps=10", "tracking.register=false",
            "tracking.promote_alias=null", f"launch.runs_dir={runs}", "launch.name=product"]
    with log.open("wb") as output:
        driver = subprocess.Popen([sys.executable, "-m", "launch", "train", *args], cwd=REPO, stdout=output,
                                  stderr=subprocess.STDOUT)
    try:
        wait_for_report(runs / "product" / "metrics.jsonl", after_step=30, timeout_s=400)
        killed = train_workers()[-1].pid
        os.kill(killed, signal.SIGKILL)  # a lost worker, after the checkpoint of step 20
        driver.wait(timeout=600)
    finally:
        driver.kill()
    output = log.read_text(errors="replace")
    assert driver.returncode == 0, output[-5000:]
    # The kill happened and was survived: Ray saw the failure and the new worker resumed from a checkpoint.
    assert "Error count: 1 " in output, output[-5000:]
    resumed = [int(step) for step in re.findall(r"run product: resnet18 on 1 x cuda, resuming from step (\d+)", output)]
    assert resumed and resumed[0] >= 20, output[-5000:]
    # The worker trained on the GPU Ray gave it (CUDA_VISIBLE_DEVICES is Ray's assignment).
    placed = re.findall(r"run product: rank 0 trains on (cuda:\d+) \((.+?)\), CUDA_VISIBLE_DEVICES=(\S+)", output)
    assert placed and all(device == "cuda:0" and visible == "0" for device, _, visible in placed), placed
    summary = json.loads((runs / "product" / "summary.json").read_text())
    assert summary["device"] == "cuda" and summary["steps"] == 100
    # MLflow recorded the GPU's system metrics (NVML through nvidia-ml-py) in the run.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=summary["tracking_uri"])
    metrics = client.get_run(summary["mlflow_run_id"]).data.metrics
    gpu_metrics = [name for name in metrics if name.startswith("system/gpu_0_")]
    assert "system/gpu_0_utilization_percentage" in gpu_metrics, sorted(metrics)
    history = client.get_metric_history(summary["mlflow_run_id"], "system/gpu_0_memory_usage_megabytes")
    assert history and max(m.value for m in history) > 100  # the worker's model and batches
