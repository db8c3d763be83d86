"""`bench step`: the engine's training step against a bare PyTorch loop, side by side.

Both run the same model, optimizer, precision and synthetic device-resident batches in this process,
alternating round by round so that drifting clocks and thermals hit both alike. The bare loop is what
one would write by hand: autocast forward, loss, backward, optimizer step. The engine is `trainer.run`
itself, with everything a real run has (schedule, non-finite bookkeeping, reports, EMA if configured)
except data loading and checkpoints; its images/s is the one its own report prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from configs.schema import RunConfig

from launch.bench import median_interval, spread, synchronize, trust_warning


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
    def round_ratios(self) -> list[float]:
        """Engine over bare images/s of each round: the two ran back to back, so a machine that drifts
        slower or faster during the benchmark moves both alike."""
        return [engine / bare for engine, bare in zip(self.engine_images_per_s, self.bare_images_per_s, strict=True)]

    @property
    def engine_over_bare(self) -> float:
        """The median of the rounds' ratios."""
        return statistics.median(self.round_ratios)

    def as_json(self) -> str:
        """One machine-readable line."""
        record = dataclasses.asdict(self)
        record["engine_over_bare"] = self.engine_over_bare
        return json.dumps(record)

    def table(self) -> str:
        """The human-readable report."""
        variants = {"bare": self.bare_images_per_s, "engine": self.engine_images_per_s}
        rows = [f"bench step: {self.model} {self.image_size}px, batch {self.batch_size}, {self.precision}, "
                f"{self.device}, {self.steps} timed steps per round, {len(self.bare_images_per_s)} rounds",
                f"{'variant':<8} {'images/s median (min-max)':>30} {'GFLOP/s':>10}"]
        for name, values in variants.items():
            gflops = statistics.median(values) * self.training_gflops_per_image
            rows.append(f"{name:<8} {spread(values):>30} {gflops:>10.1f}")
        low, high = median_interval(self.round_ratios)
        rows.append(f"engine / bare: {self.engine_over_bare:.3f} (median of the rounds' ratios; 95% interval "
                    f"{low:.3f}-{high:.3f})")
        if (warning := trust_warning({"engine / bare": self.round_ratios})) is not None:
            rows.append(warning)
        return "\n".join(rows)


def bare_rounds(cfg: RunConfig, *, steps: int, rounds: int, device: torch.device,
                timed: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext) -> list[float]:
    """Images/s of a hand-written loop (autocast forward, loss, backward, optimizer step) on synthetic
    device-resident batches: `rounds` timed rounds of `steps` steps each, after `steps` warm-up steps
    (kernel selection, allocator, caches; and compilation with precision.compile). `timed`: a context each
    timed round runs in (bench gpu samples the GPU's utilisation there)."""
    from data_pipeline.synthetic import SyntheticLoader
    from trainer import prepare_model
    from trainer.losses import build_criterion
    from trainer.models import build_model
    from trainer.optim import build_optimizer
    from trainer.precision import resolve_compile, resolve_precision
    from trainer.strategy.single import bare_module

    torch.manual_seed(cfg.seed)
    model = prepare_model(build_model(cfg.model), device, channels_last=cfg.precision.channels_last,
                          compile_mode=resolve_compile(cfg.precision, device, strategy=cfg.distributed.strategy))
    optimizer = build_optimizer(bare_module(model), cfg.optim, cfg.optim.lr)
    precision = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")
    criterion = build_criterion(cfg.optim, num_classes=cfg.model.num_classes)
    batches = SyntheticLoader(cfg.data, train=True, num_batches=(rounds + 1) * steps, seed=cfg.seed,
                              device=device).iter_epoch(0)
    model.train()

    def run_steps() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            images, labels = next(batches)
            with precision.autocast():
                loss = criterion(model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return steps * cfg.data.batch_size / (time.perf_counter() - start)

    run_steps()  # warm-up
    rates = []
    for _ in range(rounds):
        with timed():
            rates.append(run_steps())
    return rates


class ReportRecorder:
    """A sink that keeps every training report (the ones with a loss), in order."""

    def __init__(self) -> None:
        self.reports: list[dict[str, float]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Keep `metrics` if it is a training report."""
        if "loss" in metrics:
            self.reports.append(metrics)

    def on_checkpoint(self, step: int, url: str) -> None:
        """Nothing: benchmarks write no checkpoints."""


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
    recorder = ReportRecorder()
    trainer.run(engine_cfg, single_process_context(), [recorder])
    return recorder.reports[-1]["images_per_s"]


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
        bare += bare_rounds(cfg, steps=steps, rounds=1, device=device)
        engine.append(engine_images_per_s(cfg, steps=steps))
    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} threads)"
    return StepBench(
        model=cfg.model.name, image_size=cfg.data.image_size, batch_size=cfg.data.batch_size,
        precision=resolve_precision(cfg.precision, device).name, device=device_name, steps=steps,
        bare_images_per_s=bare, engine_images_per_s=engine,
        training_gflops_per_image=training_flops_per_image(build_model(cfg.model), cfg.data.image_size) / 1e9,
    )
