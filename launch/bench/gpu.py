"""`bench gpu`: one command that measures a GPU node, side by side in one process.

Rows: the bare step on synthetic device-resident data (the compute ceiling), the engine on the same data,
the DALI mixed pipeline alone (the decode ceiling), the engine fed by DALI mixed from JPEG files, and the
engine fed by the baseline DataLoader with every CPU core; the bare step and the engine synthetic also
compiled. Per row: images/s (median and spread of its rounds), the data-wait share, peak GPU memory, GPU
utilisation (NVML, where present). The JPEG files (ImageNet-like: 500x375 at quality 90) are generated on
local disk first and kept for the next run.

On a machine without a GPU the same command runs a tiny configuration, and the rows that need a GPU say why
they were skipped: that is how the CPU test suite runs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from configs.errors import ConfigError
from configs.loader import load_config
from configs.schema import RunConfig
from launch.bench import spread, synchronize, trust_warning


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuBenchSettings:
    """What `bench gpu` runs."""

    model: str = "resnet50"
    image_size: int = 224
    batch_size: int = 256
    precision: str = "bf16"
    steps: int = 30
    """Steps per timed round (and per engine report)."""
    rounds: int = 3
    """Timed rounds per row, after one warm-up round."""
    images: int = 20_000
    """Generated JPEG training files."""
    classes: int = 1000
    """Classes of the generated files (one validation image each)."""
    dali_threads: int = 8
    """DALI CPU threads per pipeline."""
    loader_workers: int = 0
    """DataLoader processes for the baseline row (0: every CPU core)."""

    @classmethod
    def tiny(cls) -> GpuBenchSettings:
        """A configuration a 2-core CPU runs in about a minute."""
        return cls(model="resnet18", image_size=16, batch_size=8, precision="fp32", steps=3, rounds=2,
                   images=96, classes=4, dali_threads=1, loader_workers=1)


@dataclass(frozen=True, slots=True)
class Row:
    """One measured configuration, or why it was skipped."""

    name: str
    images_per_s: list[float]
    """Each timed round's images/s (empty when skipped)."""
    data_wait_share: float | None = None
    """Median share of the step time spent waiting for data (engine rows)."""
    peak_memory_gb: float | None = None
    """torch's peak allocated GPU memory during the row."""
    gpu_utilisation: float | None = None
    """Mean GPU utilisation during the row, in percent (NVML)."""
    mfu: float | None = None
    """Model FLOPs utilisation of the median: training FLOP/s over the device's dense bf16/fp16 peak (GPUs of
    the peak table)."""
    skipped: str | None = None
    """Why the row did not run."""


@dataclass(frozen=True, slots=True)
class GpuBench:
    """The whole measurement: the machine, the settings and the rows."""

    machine: dict[str, str]
    settings: dict[str, object]
    rows: list[Row]

    def as_json(self) -> str:
        """One machine-readable line."""
        return json.dumps(dataclasses.asdict(self))

    def _cells(self) -> list[list[str]]:
        cells = []
        for row in self.rows:
            if row.skipped is not None:
                cells.append([row.name, f"skipped: {row.skipped}", "", "", "", ""])
                continue
            cells.append([row.name, spread(row.images_per_s),
                          "-" if row.data_wait_share is None else f"{100 * row.data_wait_share:.0f}%",
                          "-" if row.peak_memory_gb is None else f"{row.peak_memory_gb:.1f}",
                          "-" if row.gpu_utilisation is None else f"{row.gpu_utilisation:.0f}%",
                          "-" if row.mfu is None else f"{100 * row.mfu:.1f}%"])
        return cells

    HEADER = ["row", "images/s median (min-max)", "data wait", "peak GPU GB", "GPU util", "MFU"]

    def _title(self) -> str:
        s = self.settings
        return (f"bench gpu: {s['model']} {s['image_size']}px, batch {s['batch_size']}, {s['precision']}, "
                f"channels-last, {s['rounds']} rounds of {s['steps']} steps; "
                + ", ".join(f"{key} {value}" for key, value in self.machine.items()))

    def table(self) -> str:
        """The human-readable report."""
        cells = [self.HEADER, *self._cells()]
        measured = [row for row in cells if not row[1].startswith("skipped")]
        widths = [max(len(row[i]) for row in (measured if i else cells)) for i in range(len(self.HEADER))]
        lines = [self._title()]
        for row in cells:
            if row[1].startswith("skipped"):
                lines.append(f"{row[0]:<{widths[0]}}  {row[1]}")
            else:
                lines.append("  ".join(f"{cell:>{width}}" if i else f"{cell:<{width}}"
                                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))))
        rounds = {row.name: row.images_per_s for row in self.rows if row.images_per_s}
        if (warning := trust_warning(rounds)) is not None:
            lines.append(warning)
        return "\n".join(lines)

    def markdown(self) -> str:
        """The report as a Markdown table, for BENCHMARKS.md."""
        lines = [self._title(), "", "| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in self._cells()]
        return "\n".join(lines) + "\n"


def machine_facts(device: torch.device) -> dict[str, str]:
    """Device name, driver, torch, CUDA and DALI versions (what is there to read)."""
    facts = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
             f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
             "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    if device.type == "cuda":
        facts["driver"] = _driver_version()
    try:
        import nvidia.dali

        facts["dali"] = nvidia.dali.__version__
    except ImportError:
        facts["dali"] = "not installed"
    return facts


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - NVML absent: ask nvidia-smi, else say so
        import subprocess

        try:
            found = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=10, check=False).stdout
            return found.splitlines()[0].strip() if found.strip() else "unknown"
        except OSError:
            return "unknown"


@contextmanager
def watch_gpu(device: torch.device) -> Iterator[Callable[[], tuple[float | None, float | None]]]:
    """Sample the GPU's utilisation (NVML, 5 times a second) while the block runs and track torch's peak
    memory; yields a function that returns (peak memory in GB, mean utilisation in %), None where unknown."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            try:
                samples.append(float(torch.cuda.utilization(device)))
            except Exception:  # noqa: BLE001 - no NVML: utilisation stays unknown
                return

    thread = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
    try:
        yield lambda: (torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
                       statistics.mean(samples) if samples else None)
    finally:
        stop.set()
        if thread is not None:
            thread.join()


def run_config(settings: GpuBenchSettings, *overrides: str) -> RunConfig:
    """The run config of the engine rows: one process, no checkpoints, no tracking, a report per round."""
    return load_config(None, [
        f"model.name={settings.model}", f"model.num_classes={settings.classes}",
        f"model.small_input={settings.image_size < 64}", f"data.image_size={settings.image_size}",
        f"data.batch_size={settings.batch_size}", f"precision.dtype={settings.precision}",
        f"data.num_workers={settings.dali_threads}", "schedule.epochs=1", "schedule.warmup_epochs=0",
        f"tracking.log_interval_steps={settings.steps}", "tracking.enabled=false", "tracking.register=false",
        "distributed.strategy=none", *overrides])


def engine_row(name: str, cfg: RunConfig, device: torch.device, *, rounds: int) -> Row:
    """The engine's own reports over one epoch of `cfg`, a report every `log_interval_steps`: the `rounds`
    reports after the first (which warms up; a shorter last one at the epoch's end is left out)."""
    import trainer
    from launch.bench.step import ReportRecorder
    from trainer.dist import single_process_context

    recorder = ReportRecorder()
    with watch_gpu(device) as measured:
        trainer.run(cfg, single_process_context(), [recorder])
        memory, utilisation = measured()
    timed = recorder.reports[1:rounds + 1]
    assert timed, f"{name}: the epoch is too short for a report after the warm-up"
    return Row(name, [report["images_per_s"] for report in timed],
               data_wait_share=statistics.median(report["data_wait_share"] for report in timed),
               peak_memory_gb=memory, gpu_utilisation=utilisation)


def dali_alone_row(settings: GpuBenchSettings, root: Path, device: torch.device) -> Row:
    """The DALI mixed pipeline alone, no model: whole epochs over the generated files (the first warms up)."""
    from data_pipeline import build_loaders

    cfg = run_config(settings, f"data.root={root}", "data.loader=dali").data
    loaders = build_loaders(cfg, seed=0, device=device, dtype=torch.float16)
    rates = []
    with watch_gpu(device) as measured:
        for epoch in range(settings.rounds + 1):
            start, images = time.perf_counter(), 0
            for batch, _ in loaders.train.iter_epoch(epoch):
                images += batch.shape[0]
            synchronize(device)
            if epoch:
                rates.append(images / (time.perf_counter() - start))
        memory, utilisation = measured()
    return Row("DALI mixed alone (decode ceiling)", rates, peak_memory_gb=memory, gpu_utilisation=utilisation)


def with_mfu(row: Row, settings: GpuBenchSettings, device_name: str) -> Row:
    """`row` with its MFU filled in, where the peak table knows the device (a model row: the DALI row has none)."""
    from launch.bench.train import peak_tflops
    from trainer.models import build_model
    from trainer.models.flops import training_flops_per_image

    peak = peak_tflops(device_name, settings.precision)
    if peak is None or not row.images_per_s or row.name.startswith("DALI"):
        return row
    model = run_config(settings).model
    flops = training_flops_per_image(build_model(model), settings.image_size)
    return dataclasses.replace(row, mfu=statistics.median(row.images_per_s) * flops / (1e12 * peak))


def generate_jpegs(root: Path, settings: GpuBenchSettings) -> Path:
    """ImageNet-like JPEG files and their index under `root`, made once (kept for the next run)."""
    from data_pipeline.prepare import index_folder, index_is_current, prepare_index
    from launch.bench.data import write_photo_like_jpegs

    marker = root / "generated.json"
    wanted = {"images": settings.images, "classes": settings.classes}
    if marker.is_file() and json.loads(marker.read_text()) == wanted and index_is_current(index_folder(root, None)):
        return root
    write_photo_like_jpegs(root, num_images=settings.images, num_classes=settings.classes,
                           num_processes=os.cpu_count() or 1)
    prepare_index(str(root))
    marker.write_text(json.dumps(wanted))
    return root


def bench_gpu(out: Path, settings: GpuBenchSettings | None = None, *,
              log: Callable[[str], None] = print) -> GpuBench:
    """Measure every row on this process's device (its first GPU, else the CPU with `GpuBenchSettings.tiny`);
    write bench_gpu.json and bench_gpu.md into `out`."""
    from launch.bench.step import bare_rounds
    from trainer.dist import single_process_context

    device = single_process_context().device
    gpu = device.type == "cuda"
    settings = settings or (GpuBenchSettings() if gpu else GpuBenchSettings.tiny())
    # The file-fed rows take one epoch of the generated files: a report every `interval` steps gives the
    # warm-up and `rounds` timed intervals within it.
    interval = min(settings.steps, settings.images // settings.batch_size // (settings.rounds + 1))
    if interval < 1:
        raise ConfigError(f"--images={settings.images} make fewer than {settings.rounds + 1} steps of "
                          f"{settings.batch_size}: generate more files or use fewer rounds")
    out.mkdir(parents=True, exist_ok=True)
    log(f"bench gpu: generating {settings.images} JPEG files under {out / 'data'} (kept for the next run)")
    root = generate_jpegs(out / "data", settings)
    no_gpu = "needs a GPU (DALI's mixed decoder)"
    no_compile = "torch.compile rows run on GPUs only (inductor's CPU compile of a ResNet takes minutes here)"
    synthetic = ["data.dataset=synthetic", f"data.synthetic_classes={settings.classes}",
                 f"data.synthetic_images={settings.batch_size * settings.steps * (settings.rounds + 1)}"]
    rows: list[Row] = []
    for compiled in (False, True):
        suffix = ", compiled" if compiled else ""
        if compiled and not gpu:
            rows += [Row(f"bare step, synthetic{suffix}", [], skipped=no_compile),
                     Row(f"engine, synthetic{suffix}", [], skipped=no_compile)]
            continue
        cfg = run_config(settings, *synthetic, f"precision.compile={compiled}")
        log(f"bench gpu: bare step, synthetic{suffix}")
        with watch_gpu(device) as measured:
            rates = bare_rounds(cfg, steps=settings.steps, rounds=settings.rounds, device=device)
            memory, utilisation = measured()
        rows.append(Row(f"bare step, synthetic{suffix} (compute ceiling)", rates, peak_memory_gb=memory,
                        gpu_utilisation=utilisation))
        log(f"bench gpu: engine, synthetic{suffix}")
        rows.append(engine_row(f"engine, synthetic{suffix}", cfg, device, rounds=settings.rounds))
    files = [f"data.root={root}", f"tracking.log_interval_steps={interval}"]
    if gpu:
        log("bench gpu: DALI mixed alone")
        rows.append(dali_alone_row(settings, root, device))
        log("bench gpu: engine + DALI mixed")
        rows.append(engine_row("engine + DALI mixed", run_config(settings, *files, "data.loader=dali"), device,
                               rounds=settings.rounds))
    else:
        rows += [Row("DALI mixed alone (decode ceiling)", [], skipped=no_gpu),
                 Row("engine + DALI mixed", [], skipped=no_gpu)]
    workers = settings.loader_workers or os.cpu_count() or 1
    loader = f"engine + DataLoader ({workers} worker{'s' if workers > 1 else ''})"
    log(f"bench gpu: {loader}")
    rows.append(engine_row(loader,
                           run_config(settings, *files, "data.loader=torch",
                                      f"data.num_workers={workers}"), device, rounds=settings.rounds))
    machine = machine_facts(device)
    rows = [with_mfu(row, settings, machine["device"]) for row in rows]
    result = GpuBench(machine=machine, settings=dataclasses.asdict(settings), rows=rows)
    (out / "bench_gpu.json").write_text(result.as_json() + "\n")
    (out / "bench_gpu.md").write_text(result.markdown())
    return result
