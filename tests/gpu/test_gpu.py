"""What only a GPU can check: DALI's mixed decoder against its CPU pipeline, a bf16 channels-last ResNet-50
step, nccl DDP with checkpoint and resume, and `bench gpu` end to end. `pytest -m gpu` runs them (about
3 minutes on one H100-class GPU); without a GPU they are skipped, with the reason printed (-ra)."""

from __future__ import annotations

import dataclasses
import json
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


def test_dali_mixed_decoding_matches_the_cpu_pipeline(digits_root: Path) -> None:
    pytest.importorskip("nvidia.dali", reason="the dali extra is not installed")
    from data_pipeline import build_loaders

    cfg = DataConfig(dataset="folder", root=str(digits_root), batch_size=32, num_workers=2, image_size=32,
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


def test_bf16_channels_last_resnet50_steps(tmp_path: Path) -> None:
    cfg = load_config("resnet50-synthetic-bench-1gpu", [
        "data.batch_size=32", "data.synthetic_images=256", "data.synthetic_classes=1000", "schedule.epochs=1",
        "tracking.log_interval_steps=2", "precision.dtype=bf16", "precision.channels_last=true"])
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
        # A whole run in the nccl group: crash after a checkpoint, resume to the end.
        cfg = load_config("quickstart", [
            "data.dataset=synthetic", "data.synthetic_images=512", "data.synthetic_classes=10",
            "data.image_size=32", "data.batch_size=32", "schedule.epochs=2", "distributed.strategy=ddp",
            "tracking.log_interval_steps=4", "checkpoint.interval_steps=12", f"checkpoint.url={tmp_path}"])
        with pytest.raises(Interrupt):
            trainer.run(cfg, ctx, [CrashAt(20)])
        assert open_checkpoints(str(tmp_path)).latest().step == 16  # type: ignore[union-attr]
        resumed = trainer.run(cfg, ctx, [])
        assert resumed.start_step == 16 and resumed.steps == 32 and resumed.val["val_images"] == 32
    finally:
        torch.distributed.destroy_process_group()


def test_bench_gpu_end_to_end(tmp_path: Path) -> None:
    from launch.bench.gpu import GpuBenchSettings, bench_gpu

    pytest.importorskip("nvidia.dali", reason="the dali extra is not installed")
    settings = dataclasses.replace(GpuBenchSettings(), model="resnet18", batch_size=64, steps=5, rounds=2, images=1536,
                                   classes=8)
    result = bench_gpu(tmp_path, settings)
    rows = {row.name: row for row in result.rows}
    assert not any(row.skipped for row in result.rows)
    assert all(len(row.images_per_s) == 2 and min(row.images_per_s) > 0 for row in result.rows)
    assert rows["engine + DALI mixed"].peak_memory_gb and rows["engine + DALI mixed"].peak_memory_gb > 0
    assert json.loads((tmp_path / "bench_gpu.json").read_text())["machine"]["device"] == result.machine["device"]
