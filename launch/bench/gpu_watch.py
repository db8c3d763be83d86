"""What `bench gpu` and the other benches record of the machine and its GPU while they measure: the
machine's facts (device, driver, versions), GPU memory and NVML utilisation sampled only inside timed
rounds, the reports of timed rounds, and the `Row` a measurement becomes."""

from __future__ import annotations

import os
import platform
import statistics
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from launch.bench.step import ReportRecorder


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
    notes: str = ""
    """What else was measured (first-step time, the DALI reader threads' CPU time per batch)."""


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


class GpuWatch:
    """One row's GPU facts: torch's peak allocated memory over the whole row, and the GPU's utilisation (NVML,
    5 samples a second) inside the row's timed rounds only (not through compilation or worker start-up)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.samples: list[float] = []
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def start(self) -> None:
        """Sample from now on (a timed round begins)."""
        if self.device.type != "cuda" or self._thread is not None:
            return
        stop = self._stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                try:
                    self.samples.append(float(torch.cuda.utilization(self.device)))
                except Exception:  # noqa: BLE001 - no NVML (nvidia-ml-py): utilisation stays unknown
                    return

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (the timed round ended)."""
        if self._thread is not None and self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Sample while the block (one timed round) runs."""
        self.start()
        try:
            yield
        finally:
            self.stop()

    def peak_memory_gb(self) -> float | None:
        """torch's peak allocated GPU memory since the row began."""
        return torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else None

    def utilisation(self) -> float | None:
        """Mean utilisation in % over the timed rounds; None without samples (a CPU, no NVML)."""
        return statistics.mean(self.samples) if self.samples else None


class TimedReports(ReportRecorder):
    """A `ReportRecorder` that has `watch` sample between the first report (the end of the warm-up interval)
    and the last timed one."""

    def __init__(self, watch: GpuWatch, rounds: int) -> None:
        super().__init__()
        self.watch = watch
        self.rounds = rounds

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Keep a training report; start or stop sampling at the timed interval's bounds."""
        kept = len(self.reports)
        super().log(metrics, step)
        if len(self.reports) == kept:
            return
        if len(self.reports) == 1:
            self.watch.start()
        elif len(self.reports) == self.rounds + 1:
            self.watch.stop()
