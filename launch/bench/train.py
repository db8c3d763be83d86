"""`bench train`: end-to-end throughput of one whole training run, per device and in all, with MFU on GPUs
whose peak the table knows."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from configs.schema import RunConfig


PEAK_DENSE_TFLOPS = [
    # (substring of torch.cuda.get_device_name, dense bf16/fp16 tensor-core peak in TFLOP/s), most specific
    # first; from the vendors' datasheets (the "with sparsity" figures are twice these).
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),   # SXM
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense tensor-core peak for bf16/fp16, if the table knows it (None for fp32 and CPUs)."""
    if precision not in ("bf16", "fp16"):
        return None
    return next((peak for key, peak in PEAK_DENSE_TFLOPS if key in device_name), None)


@dataclass(frozen=True, slots=True)
class TrainBench:
    """End-to-end throughput of one whole training run (data loading, steps, reports), from its summary."""

    config: str
    model: str
    image_size: int
    device: str
    world_size: int
    precision: str
    epochs: int
    steps: int
    images_per_s: float
    """Images trained per second, all workers together, evaluation excluded (the run's own measurement)."""
    training_gflops_per_image: float
    peak_tflops_per_device: float | None
    run_dir: str

    @property
    def images_per_s_per_device(self) -> float:
        return self.images_per_s / self.world_size

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation: achieved training FLOP/s per device over the device's peak."""
        if self.peak_tflops_per_device is None:
            return None
        return self.images_per_s_per_device * self.training_gflops_per_image / (1000 * self.peak_tflops_per_device)

    def as_json(self) -> str:
        """One machine-readable line."""
        return json.dumps({**dataclasses.asdict(self), "images_per_s_per_device": self.images_per_s_per_device,
                           "mfu": self.mfu})

    def table(self) -> str:
        """The human-readable report."""
        mfu = "-" if self.mfu is None else f"{100 * self.mfu:.1f}%"
        rows = [
            ("run", f"{self.config}: {self.model} {self.image_size}px, {self.precision}, {self.epochs} epochs, "
                    f"{self.steps} steps"),
            ("devices", f"{self.world_size} x {self.device}"),
            ("images/s (all)", f"{self.images_per_s:.1f}"),
            ("images/s per device", f"{self.images_per_s_per_device:.1f}"),
            ("training GFLOP per image", f"{self.training_gflops_per_image:.2f}"),
            ("TFLOP/s per device", f"{self.images_per_s_per_device * self.training_gflops_per_image / 1000:.3f}"),
            ("MFU", mfu + ("" if self.mfu is not None else " (needs a GPU of the peak table and bf16/fp16)")),
            ("run folder", self.run_dir),
        ]
        width = max(len(label) for label, _ in rows)
        return "bench train\n" + "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def untracked(cfg: RunConfig) -> RunConfig:
    """`cfg` without tracking, registration or promotion: benchmark runs are not model versions."""
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, enabled=False, register=False,
                                                                 promote_alias=None))


def bench_train(cfg: RunConfig, *, config_name: str) -> TrainBench | None:
    """Run `cfg` as `train` would (its launcher, workers and data), without tracking or registration, and
    report its measured throughput; the run folder stays for inspection. None on the ranks of a torchrun job
    other than rank 0, which reports."""
    from launch.orchestration import start_run
    from trainer.models import build_model
    from trainer.models.flops import training_flops_per_image
    from trainer.precision import resolve_precision

    cfg = untracked(cfg)
    summary = start_run(cfg)
    if summary is None:
        return None
    precision = resolve_precision(cfg.precision, torch.device(summary.device)).name
    return TrainBench(
        config=config_name, model=cfg.model.name, image_size=cfg.data.image_size, device=summary.device_name,
        world_size=summary.world_size, precision=precision, epochs=summary.epochs, steps=summary.steps,
        images_per_s=summary.images_per_s,
        training_gflops_per_image=training_flops_per_image(build_model(cfg.model), cfg.data.image_size) / 1e9,
        peak_tflops_per_device=peak_tflops(summary.device_name, precision), run_dir=summary.run_dir)
