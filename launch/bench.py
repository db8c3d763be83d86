"""`python -m launch bench step|data`: throughput of the training step and of the data loaders.

`bench step`: the engine's training step against a bare PyTorch loop, side by side.

Both run the same model, optimizer, precision and synthetic device-resident batches in this process,
alternating round by round so that drifting clocks and thermals hit both alike. The bare loop is what
one would write by hand: autocast forward, loss, backward, optimizer step. The engine is `trainer.run`
itself, with everything a real run has (schedule, non-finite bookkeeping, reports, EMA if configured)
except data loading and checkpoints; its images/s is the one its own report prints.

`bench data`: the DALI pipeline (CPU threads; and the mixed GPU decoder when there is a GPU) against the
baseline DataLoader with as many worker processes as DALI has threads, over the same JPEG files with the
same training crops, alternating round by round.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from configs.schema import DataConfig, RunConfig


@dataclass(frozen=True, slots=True)
class StepBench:
    """Images/s of each variant in each round, and what was measured."""

    model: str
    image_size: int
    batch_size: int
    precision: str
    device: str
    steps: int
    """Timed steps per variant per round (after as many untimed warm-up steps)."""
    bare_images_per_s: list[float]
    engine_images_per_s: list[float]
    training_gflops_per_image: float

    @property
    def engine_over_bare(self) -> float:
        """Median engine images/s over median bare images/s."""
        return statistics.median(self.engine_images_per_s) / statistics.median(self.bare_images_per_s)

    def as_json(self) -> str:
        """One machine-readable line."""
        record = dataclasses.asdict(self)
        record["engine_over_bare"] = self.engine_over_bare
        return json.dumps(record)

    def table(self) -> str:
        """The human-readable report."""
        rows = [f"bench step: {self.model} {self.image_size}px, batch {self.batch_size}, {self.precision}, "
                f"{self.device}, {self.steps} timed steps per round",
                f"{'variant':<8} {'images/s (median)':>18} {'rounds':>30} {'GFLOP/s':>10}"]
        for name, values in (("bare", self.bare_images_per_s), ("engine", self.engine_images_per_s)):
            median = statistics.median(values)
            rounds = " ".join(f"{v:.1f}" for v in values)
            rows.append(f"{name:<8} {median:>18.1f} {rounds:>30} {median * self.training_gflops_per_image:>10.1f}")
        rows.append(f"engine / bare: {self.engine_over_bare:.3f}")
        return "\n".join(rows)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU, where work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_images_per_s(cfg: RunConfig, *, steps: int, device: torch.device) -> float:
    """Images/s of a hand-written loop over `steps` steps, after `steps` warm-up steps."""
    from data_pipeline.synthetic import SyntheticLoader
    from trainer.models import build_model
    from trainer.optim import build_optimizer
    from trainer.precision import resolve_precision

    torch.manual_seed(cfg.seed)
    model: nn.Module = build_model(cfg.model).to(device)
    if cfg.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr)
    if cfg.precision.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    precision = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    batches = SyntheticLoader(cfg.data, num_batches=2 * steps, seed=cfg.seed, device=device).iter_epoch(0)
    model.train()

    def run_steps() -> None:
        for _ in range(steps):
            images, labels = next(batches)
            with precision.autocast():
                loss = criterion(model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)

    run_steps()  # warm-up: kernel selection, allocator, caches
    start = time.perf_counter()
    run_steps()
    elapsed_s = time.perf_counter() - start
    return steps * cfg.data.batch_size / elapsed_s


class _LastReport:
    def __init__(self) -> None:
        self.images_per_s = 0.0

    def log(self, metrics: dict[str, float], step: int) -> None:
        if "images_per_s" in metrics:
            self.images_per_s = metrics["images_per_s"]

    def on_checkpoint(self, step: int, url: str) -> None:
        pass


def engine_images_per_s(cfg: RunConfig, *, steps: int) -> float:
    """Images/s that `trainer.run` reports for its second epoch of `steps` steps (the first warms up)."""
    import trainer
    from trainer.dist import single_process_context

    engine_cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, synthetic_images=steps * cfg.data.batch_size),
        schedule=dataclasses.replace(cfg.schedule, epochs=2, warmup_epochs=1.0, decay="cosine"),
        tracking=dataclasses.replace(cfg.tracking, log_interval_steps=steps),
        checkpoint=dataclasses.replace(cfg.checkpoint, url=None),
        optim=dataclasses.replace(cfg.optim, accumulation_steps=1),
    )
    report = _LastReport()
    trainer.run(engine_cfg, single_process_context(), [report])
    return report.images_per_s


def bench_step(cfg: RunConfig, *, steps: int, rounds: int) -> StepBench:
    """Measure bare and engine images/s on this process's device, alternating for `rounds` rounds."""
    from trainer.dist import single_process_context
    from trainer.models import build_model
    from trainer.models.flops import training_flops_per_image
    from trainer.precision import resolve_precision

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset="synthetic",
                                                            synthetic_classes=cfg.model.num_classes))
    device = single_process_context().device
    bare, engine = [], []
    for _ in range(rounds):
        bare.append(bare_images_per_s(cfg, steps=steps, device=device))
        engine.append(engine_images_per_s(cfg, steps=steps))
    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} threads)"
    return StepBench(
        model=cfg.model.name, image_size=cfg.data.image_size, batch_size=cfg.data.batch_size,
        precision=resolve_precision(cfg.precision, device).name, device=device_name, steps=steps,
        bare_images_per_s=bare, engine_images_per_s=engine,
        training_gflops_per_image=training_flops_per_image(build_model(cfg.model), cfg.data.image_size) / 1e9,
    )


@dataclass(frozen=True, slots=True)
class DataBench:
    """Images/s that each loader delivered over whole training epochs of the same files, per round."""

    num_images: int
    image_size: int
    batch_size: int
    num_workers: int
    """DataLoader processes for the baseline, DALI CPU threads for DALI."""
    dtype: str
    source: str
    """Where the JPEG files came from."""
    images_per_s: dict[str, list[float]]
    """Variant ('torch', 'dali-cpu', 'dali-mixed' on a GPU) -> images/s of each timed round."""

    def ratio(self, variant: str) -> float:
        """Median images/s of `variant` over the baseline's."""
        return statistics.median(self.images_per_s[variant]) / statistics.median(self.images_per_s["torch"])

    def as_json(self) -> str:
        """One machine-readable line."""
        record = dataclasses.asdict(self)
        record["over_torch"] = {variant: self.ratio(variant) for variant in self.images_per_s}
        return json.dumps(record)

    def table(self) -> str:
        """The human-readable report."""
        rows = [f"bench data: {self.num_images} images ({self.source}) -> {self.image_size}px {self.dtype}, "
                f"batch {self.batch_size}, {self.num_workers} workers/threads, training crops",
                f"{'loader':<10} {'images/s (median)':>18} {'rounds':>30} {'/ torch':>8}"]
        for variant, values in self.images_per_s.items():
            rounds = " ".join(f"{v:.0f}" for v in values)
            rows.append(f"{variant:<10} {statistics.median(values):>18.1f} {rounds:>30} {self.ratio(variant):>8.2f}")
        return "\n".join(rows)


def write_photo_like_jpegs(root: Path, *, num_images: int, size: tuple[int, int] = (500, 375), quality: int = 90,
                           num_classes: int = 10, seed: int = 0) -> None:
    """`num_images` JPEGs of `size` at `quality` in an ImageNet-layout tree (train/ and a one-image-per-class
    val/), with smooth colour fields plus grain, so they compress like photographs (about 60-120 kB at
    500x375, quality 90), not like flat colour or white noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    for i in range(num_images + num_classes):
        split, label = ("train", i % num_classes) if i < num_images else ("val", i - num_images)
        coarse = Image.fromarray(rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
        folder = root / split / f"class_{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.JPEG",
                                                                               quality=quality)


def bench_data(cfg: DataConfig, *, rounds: int, variants: list[str], source: str) -> DataBench:
    """Time whole training epochs of each loader variant over the indexed data set at `cfg.root`, alternating
    variants round by round after one untimed warm-up epoch each (worker start-up, pipeline build)."""
    from data_pipeline import build_loaders

    device_of = {"torch": torch.device("cpu"), "dali-cpu": torch.device("cpu"), "dali-mixed": torch.device("cuda")}
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    loaders = {}
    for variant in variants:
        loader_cfg = dataclasses.replace(cfg, loader="torch" if variant == "torch" else "dali")
        loaders[variant] = build_loaders(loader_cfg, seed=0, device=device_of[variant], dtype=dtype)
    images_per_s: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_ in range(rounds + 1):
        for variant, built in loaders.items():
            device = device_of[variant]
            start = time.perf_counter()
            images = 0
            for batch, _ in built.train.iter_epoch(round_):
                images += batch.shape[0]
            synchronize(device)
            if round_ > 0:
                images_per_s[variant].append(images / (time.perf_counter() - start))
    return DataBench(num_images=built.num_train_images, image_size=cfg.image_size, batch_size=cfg.batch_size,
                     num_workers=cfg.num_workers, dtype=str(dtype).removeprefix("torch."), source=source,
                     images_per_s=images_per_s)


@dataclass(frozen=True, slots=True)
class LaunchBench:
    """Seconds measured for one small 2-worker run under each launcher."""

    workers: int
    torchrun_first_step_s: float
    """From starting `torchrun` to the first step's report in metrics.jsonl."""
    ray_first_step_s: float
    """From starting `python -m launch train` (a new local Ray cluster) to the first step's report."""
    ray_restart_s: float
    """From SIGKILL to one Ray worker to the first report of a step after the resumed checkpoint."""

    def as_json(self) -> str:
        """One machine-readable line."""
        return json.dumps(dataclasses.asdict(self))

    def table(self) -> str:
        """The human-readable report."""
        return "\n".join([
            f"bench launch: {self.workers} CPU workers, DDP over gloo, digits at 8 px",
            f"{'launcher':<10} {'start to first step (s)':>24} {'worker death to resumed step (s)':>34}",
            f"{'torchrun':<10} {self.torchrun_first_step_s:>24.1f} {'-':>34}",
            f"{'ray':<10} {self.ray_first_step_s:>24.1f} {self.ray_restart_s:>34.1f}",
        ])


def bench_launch(*, data_root: str, scratch: Path, workers: int = 2) -> LaunchBench:
    """Start the same small run with torchrun and with Ray (new local cluster); under Ray, kill one worker
    after step 5 and time the restart. Every step is reported (tracking.log_interval_steps=1)."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    common = [f"data.root={data_root}", "data.image_size=8", "data.batch_size=32", "data.num_workers=1",
              "distributed.strategy=ddp", f"launch.num_workers={workers}", "tracking.log_interval_steps=1",
              "checkpoint.interval_steps=5", "schedule.epochs=1", "tracking.register=false",
              f"launch.runs_dir={scratch}"]

    def reports(name: str) -> list[dict[str, float]]:
        path = scratch / name / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [record for record in map(json.loads, lines) if "loss" in record]

    def wait_for(name: str, condition: Any, timeout_s: float = 600) -> dict[str, float]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [record for record in reports(name) if condition(record)]
            if found:
                return found[0]
            time.sleep(0.05)
        raise TimeoutError(f"bench launch: run {name} reported nothing in {timeout_s} s")

    torchrun = Path(sys.executable).parent / "torchrun"
    start = time.time()
    process = subprocess.Popen([str(torchrun), "--nproc-per-node", str(workers), "-m", "launch", "train",
                                "--launcher", "torchrun", *common, "launch.name=torchrun"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    torchrun_first = wait_for("torchrun", lambda r: True)["time"] - start
    process.wait(timeout=600)  # a short run: let it finish rather than orphan its workers

    start = time.time()
    process = subprocess.Popen([sys.executable, "-m", "launch", "train", "--launcher", "ray", *common,
                                "launch.name=ray", "launch.max_failures=1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ray_first = wait_for("ray", lambda r: True)["time"] - start
        wait_for("ray", lambda r: r["step"] >= 6)  # checkpoint 5 is committed
        worker = next(p for p in psutil.process_iter(["cmdline"])
                      if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or []))
        killed = time.time()
        os.kill(worker.pid, signal.SIGKILL)
        resumed = wait_for("ray", lambda r: r["time"] > killed)
        ray_restart = resumed["time"] - killed
    finally:
        process.wait(timeout=600)
    return LaunchBench(workers=workers, torchrun_first_step_s=torchrun_first, ray_first_step_s=ray_first,
                       ray_restart_s=ray_restart)


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


def bench_train(cfg: RunConfig, *, config_name: str) -> TrainBench:
    """Run `cfg` as `train` would (its launcher, workers and data), without tracking or registration, and
    report its measured throughput; the run folder stays for inspection."""
    from trainer.models import build_model
    from trainer.models.flops import training_flops_per_image
    from trainer.precision import resolve_precision

    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, enabled=False, register=False,
                                                                promote_alias=None))
    if cfg.launch.launcher == "ray":
        from launch.ray_launcher import run_ray

        summary = run_ray(cfg)
    else:
        from launch.local import run_local

        found = run_local(cfg)
        if found is None:  # not the primary process of a torchrun job: rank 0 reports
            raise SystemExit(0)
        summary = found
    device = torch.device(summary["device"])
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    precision = resolve_precision(cfg.precision, device).name
    return TrainBench(
        config=config_name, model=cfg.model.name, image_size=cfg.data.image_size, device=device_name,
        world_size=summary["world_size"], precision=precision, epochs=summary["epochs"], steps=summary["steps"],
        images_per_s=summary["images_per_s"],
        training_gflops_per_image=training_flops_per_image(build_model(cfg.model), cfg.data.image_size) / 1e9,
        peak_tflops_per_device=peak_tflops(device_name, precision), run_dir=summary["run_dir"])
