"""`bench infer`: inference latency and throughput of one network in three runtimes, side by side.

The runtimes are what `export` hands to serving: eager PyTorch (the network itself, under
`torch.inference_mode`), the torch.export program of model.pt2 (`.module()`, as the served model runs
it), and onnxruntime's CPU session over model.onnx. Each gets the same float32 NCHW batches. Calls are
interleaved (one call of each runtime in turn, for every timed iteration), so a machine that drifts
slower or faster hits all three alike; the first `warmup` calls of each are not timed. Latency is one
call's wall time (p50/p95/p99 over the iterations); throughput is batch size x iterations over their
summed time. Weights do not change the time of a ResNet's forward pass, so the network is the config's
architecture with fresh weights.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from configs.schema import RunConfig


@dataclass(frozen=True, slots=True)
class InferRow:
    """One runtime at one batch size."""

    runtime: str
    batch_size: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    images_per_s: float


@dataclass(frozen=True, slots=True)
class InferBench:
    """What was measured, and the rows."""

    model: str
    image_size: int
    iterations: int
    threads: int
    device: str
    rows: list[InferRow]

    def as_json(self) -> str:
        """One machine-readable line."""
        return json.dumps(dataclasses.asdict(self))

    def table(self) -> str:
        """The human-readable report, with each runtime's throughput relative to eager at the same batch."""
        lines = [f"bench infer: {self.model} {self.image_size}px, float32, {self.device}, {self.threads} threads, "
                 f"{self.iterations} timed calls per runtime and batch size (interleaved)",
                 f"{'batch':>5} {'runtime':<13} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'images/s':>10} "
                 f"{'vs eager':>9}"]
        eager = {row.batch_size: row.images_per_s for row in self.rows if row.runtime == "eager"}
        for row in self.rows:
            relative = row.images_per_s / eager[row.batch_size]
            lines.append(f"{row.batch_size:>5} {row.runtime:<13} {row.p50_ms:>9.2f} {row.p95_ms:>9.2f} "
                         f"{row.p99_ms:>9.2f} {row.images_per_s:>10.1f} {relative:>8.2f}x")
        return "\n".join(lines)


def runtimes(cfg: RunConfig, folder: Path) -> dict[str, Callable[[torch.Tensor], object]]:
    """The config's network (fresh weights, seeded) as each runtime runs it, exported into `folder`."""
    from launch.tracking.artifacts import export_program
    from launch.tracking.onnx_export import INPUT_NAME, export_onnx, onnx_session
    from trainer.models import build_model

    torch.manual_seed(cfg.seed)
    network = build_model(cfg.model).eval()
    size = cfg.data.crop_size(train=False)
    export_program(network, size, folder / "model.pt2")
    export_onnx(network, size, folder / "model.onnx")
    program = torch.export.load(folder / "model.pt2").module()
    session = onnx_session(folder / "model.onnx", threads=torch.get_num_threads())

    def eager(images: torch.Tensor) -> object:
        with torch.inference_mode():
            return network(images)

    def exported(images: torch.Tensor) -> object:
        with torch.inference_mode():
            return program(images)

    def onnx(images: torch.Tensor) -> object:
        return session.run(None, {INPUT_NAME: images.numpy()})  # type: ignore[attr-defined]

    return {"eager": eager, "torch.export": exported, "onnxruntime": onnx}


def bench_infer(cfg: RunConfig, *, batch_sizes: list[int], iterations: int, warmup: int) -> InferBench:
    """Time each runtime at each batch size on this machine's CPU (see the module docstring)."""
    from launch.bench.gpu_watch import machine_facts

    size = cfg.data.crop_size(train=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as scratch:
        calls = runtimes(cfg, Path(scratch))
        for batch_size in batch_sizes:
            images = torch.randn(batch_size, 3, size, size)
            times: dict[str, list[float]] = {name: [] for name in calls}
            for iteration in range(warmup + iterations):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call(images)
                    if iteration >= warmup:
                        times[name].append(time.perf_counter() - start)
            for name, seconds in times.items():
                p50, p95, p99 = np.percentile(np.array(seconds) * 1000, [50, 95, 99]).tolist()
                rows.append(InferRow(runtime=name, batch_size=batch_size, p50_ms=p50, p95_ms=p95, p99_ms=p99,
                                     images_per_s=batch_size * len(seconds) / sum(seconds)))
    return InferBench(model=cfg.model.name, image_size=size, iterations=iterations, threads=torch.get_num_threads(),
                      device=machine_facts(torch.device("cpu"))["device"], rows=rows)
