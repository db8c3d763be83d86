"""`bench gpu`: one command that measures a GPU node, side by side in one process.

Three sections, each row with images/s (median and spread of its timed rounds), data-wait share, peak GPU
memory, GPU utilisation (NVML, sampled only inside the timed rounds) and MFU:
- compute: the bare step on synthetic device-resident data (the compute ceiling) and the engine on the same
  data, eager and compiled (torch.compile's default mode, and CUDA graphs by reduce-overhead);
- DALI: the pipeline alone over the generated JPEG files (the decode ceiling) with its configured settings,
  then one setting changed at a time (hardware-decoder share, threads, prefetch depth, memory padding, full
  decode against ROI decode, reader threads): the measurement that picks the DALI defaults;
- files: the engine fed by DALI from the files, eager and compiled, with the configured and with the fastest
  DALI settings, and fed by the baseline DataLoader with every CPU core.

The JPEG files (ImageNet-like: 500x375 at quality 90) are generated on local disk first and kept for the next
run. bench_gpu.json and bench_gpu.md are rewritten after each row, so a run cut short keeps what it measured.
On a machine without a GPU the same command runs a tiny configuration (DALI on CPU threads), and the rows
that need a GPU say why they were skipped: that is how the CPU test suite runs it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch

from configs.errors import ConfigError
from configs.loader import load_config
from configs.schema import RunConfig
from launch.bench import spread, trust_warning
from launch.bench.gpu_dali import DALI_VARIANTS, dali_alone_row, dali_variants
from launch.bench.gpu_watch import GpuWatch, Row, TimedReports, machine_facts
from launch.bench.step import bare_rounds


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
    compile_modes: tuple[str, ...] = ("default", "reduce-overhead")
    """torch.compile modes of the compiled bare-step rows (max-autotune compiles for many minutes: ask for it)."""

    @classmethod
    def tiny(cls) -> GpuBenchSettings:
        """A configuration a 2-core CPU runs in about a minute."""
        return cls(model="resnet18", image_size=16, batch_size=8, precision="fp32", steps=3, rounds=2,
                   images=96, classes=4, dali_threads=1, loader_workers=1)


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
                cells.append([row.name, f"skipped: {row.skipped}", "", "", "", "", ""])
                continue
            cells.append([row.name, spread(row.images_per_s),
                          "-" if row.data_wait_share is None else f"{100 * row.data_wait_share:.0f}%",
                          "-" if row.peak_memory_gb is None else f"{row.peak_memory_gb:.1f}",
                          "-" if row.gpu_utilisation is None else f"{row.gpu_utilisation:.0f}%",
                          "-" if row.mfu is None else f"{100 * row.mfu:.1f}%", row.notes or "-"])
        return cells

    HEADER = ["row", "images/s median (min-max)", "data wait", "peak GPU GB", "GPU util", "MFU", "notes"]

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
                lines.append("  ".join(f"{cell:>{width}}" if 0 < i < len(row) - 1 else f"{cell:<{width}}"
                                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip())
        rounds = {row.name: row.images_per_s for row in self.rows if row.images_per_s}
        if (warning := trust_warning(rounds)) is not None:
            lines.append(warning)
        return "\n".join(lines)

    def markdown(self) -> str:
        """The report as a Markdown table, for BENCHMARKS.md."""
        lines = [self._title(), "", "| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in self._cells()]
        return "\n".join(lines) + "\n"


def run_config(settings: GpuBenchSettings, *overrides: str) -> RunConfig:
    """The run config of the engine rows: one process, no checkpoints, no tracking, a report per round."""
    return load_config(None, [
        f"model.name={settings.model}", f"model.num_classes={settings.classes}",
        f"model.small_input={settings.image_size < 64}", f"data.image_size={settings.image_size}",
        f"data.batch_size={settings.batch_size}", f"precision.dtype={settings.precision}",
        f"data.dali_threads={settings.dali_threads}", "schedule.epochs=1", "schedule.warmup_epochs=0",
        f"tracking.log_interval_steps={settings.steps}", "tracking.enabled=false", "tracking.register=false",
        "distributed.strategy=none", *overrides])


def engine_row(name: str, cfg: RunConfig, device: torch.device, *, rounds: int) -> Row:
    """The engine's own reports over one epoch of `cfg`, a report every `log_interval_steps`: the `rounds`
    reports after the first (which warms up; a shorter last one at the epoch's end is left out)."""
    import trainer
    from trainer.dist import single_process_context

    watch = GpuWatch(device)
    recorder = TimedReports(watch, rounds)
    try:
        trainer.run(cfg, single_process_context(), [recorder])
    finally:
        watch.stop()
    timed = recorder.reports[1:rounds + 1]
    if not timed:
        raise RuntimeError(f"{name}: the epoch is too short for a report after the warm-up")
    first_step_s = next((report["first_step_s"] for report in recorder.reports if "first_step_s" in report), None)
    return Row(name, [report["images_per_s"] for report in timed],
               data_wait_share=statistics.median(report["data_wait_share"] for report in timed),
               peak_memory_gb=watch.peak_memory_gb(), gpu_utilisation=watch.utilisation(),
               notes="" if first_step_s is None else f"first step {first_step_s:.1f} s")


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


def bench_gpu(out: Path, changes: dict[str, Any] | None = None, *,
              log: Callable[[str], None] = print) -> GpuBench:
    """Measure every row on this process's device (its first GPU with `GpuBenchSettings`' defaults, else the
    CPU with `GpuBenchSettings.tiny`), those settings with `changes` applied; rewrite bench_gpu.json and
    bench_gpu.md in `out` after each row."""
    from trainer.dist import single_process_context

    device = single_process_context().device  # initialises CUDA before anything asks it (or NVML) about the GPU
    gpu = device.type == "cuda"
    settings = dataclasses.replace(GpuBenchSettings() if gpu else GpuBenchSettings.tiny(), **(changes or {}))
    # The file-fed rows take one epoch of the generated files: a report every `interval` steps gives the
    # warm-up and `rounds` timed intervals within it.
    interval = min(settings.steps, settings.images // settings.batch_size // (settings.rounds + 1))
    if interval < 1:
        raise ConfigError(f"--images={settings.images} make fewer than {settings.rounds + 1} steps of "
                          f"{settings.batch_size}: generate more files or use fewer rounds")
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_facts(device)
    rows: list[Row] = []

    def add(row: Row) -> Row:
        rows.append(with_mfu(row, settings, machine["device"]))
        result = GpuBench(machine=machine, settings=dataclasses.asdict(settings), rows=rows)
        (out / "bench_gpu.json").write_text(result.as_json() + "\n")
        (out / "bench_gpu.md").write_text(result.markdown())
        return row

    def measure(name: str, row: Callable[[], Row]) -> Row:
        """Run one row; a row that fails is recorded as failed (its traceback logged), and the others still
        run: on a new node, one broken setting must not hide the rest."""
        log(f"bench gpu: {name}")
        try:
            return add(row())
        except Exception as error:  # noqa: BLE001 - reported in the table and the log
            import traceback

            log(traceback.format_exc())
            return add(Row(name, [], skipped=f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"))

    log(f"bench gpu: generating {settings.images} JPEG files under {out / 'data'} (kept for the next run)")
    root = generate_jpegs(out / "data", settings)
    no_compile = "torch.compile rows run on GPUs only (inductor's CPU compile of a ResNet takes minutes here)"
    synthetic = ["data.dataset=synthetic", f"data.synthetic_classes={settings.classes}",
                 f"data.synthetic_images={settings.batch_size * settings.steps * (settings.rounds + 1)}"]

    # Compute: the bare step and the engine on synthetic device-resident data, eager and compiled.
    for mode in (None, *settings.compile_modes):
        suffix = "" if mode is None else ", compiled" + ("" if mode == "default" else f" {mode}")
        name = f"bare step, synthetic{suffix}" + (" (compute ceiling)" if mode is None else "")
        if mode is not None and not gpu:
            add(Row(name, [], skipped=no_compile))
            continue
        cfg = run_config(settings, *synthetic, f"precision.compile={mode is not None}",
                         f"precision.compile_mode={mode or 'default'}")

        def bare_row(name: str = name, cfg: RunConfig = cfg) -> Row:
            watch = GpuWatch(device)
            rates = bare_rounds(cfg, steps=settings.steps, rounds=settings.rounds, device=device, timed=watch.timed)
            return Row(name, rates, peak_memory_gb=watch.peak_memory_gb(), gpu_utilisation=watch.utilisation())

        measure(name, bare_row)
    for compiled in (False, True):
        name = "engine, synthetic" + (", compiled" if compiled else "")
        if compiled and not gpu:
            add(Row(name, [], skipped=no_compile))
            continue
        cfg = run_config(settings, *synthetic, f"precision.compile={compiled}")
        measure(name, functools.partial(engine_row, name, cfg, device, rounds=settings.rounds))

    # DALI alone: the configured settings, then one setting changed at a time.
    data_cfg = run_config(settings, f"data.root={root}", "data.loader=dali").data
    dali_rows: dict[str, Row] = {}
    for variant, changes in dali_variants(data_cfg).items():
        name = f"DALI alone, {variant}" + (" (decode ceiling)" if variant == "configured" else "")
        variant_cfg = dataclasses.replace(data_cfg, **changes)  # type: ignore[arg-type]
        dali_rows[variant] = measure(name, functools.partial(dali_alone_row, name, variant_cfg, device,
                                                             steps=settings.steps, rounds=settings.rounds))
    fastest = max((variant for variant, row in dali_rows.items() if row.images_per_s),
                  key=lambda variant: statistics.median(dali_rows[variant].images_per_s), default="configured")

    # Files: the engine fed by DALI (configured, and the fastest variant if another) and by the DataLoader.
    files = [f"data.root={root}", f"tracking.log_interval_steps={interval}"]
    for compiled in (False, True):
        name = "engine + DALI" + (", compiled" if compiled else "")
        if compiled and not gpu:
            add(Row(name, [], skipped=no_compile))
            continue
        cfg = run_config(settings, *files, "data.loader=dali", f"precision.compile={compiled}")
        measure(name, functools.partial(engine_row, name, cfg, device, rounds=settings.rounds))
    if fastest != "configured":
        fastest_overrides = [f"data.{key}={value}" for key, value in DALI_VARIANTS[fastest].items()]
        name = "engine + DALI" + (", compiled" if gpu else "") + f", {fastest}"
        cfg = run_config(settings, *files, "data.loader=dali", f"precision.compile={gpu}", *fastest_overrides)
        measure(name, functools.partial(engine_row, name, cfg, device, rounds=settings.rounds))
    workers = settings.loader_workers or os.cpu_count() or 1
    loader = f"engine + DataLoader ({workers} worker{'s' if workers > 1 else ''})" + (", compiled" if gpu else "")
    cfg = run_config(settings, *files, "data.loader=torch", f"data.loader_workers={workers}",
                     f"precision.compile={gpu}")
    measure(loader, functools.partial(engine_row, loader, cfg, device, rounds=settings.rounds))
    if not gpu:
        add(Row("DALI mixed decoder", [], skipped="needs a GPU (the DALI rows above ran on CPU threads)"))
    return GpuBench(machine=machine, settings=dataclasses.asdict(settings), rows=rows)
