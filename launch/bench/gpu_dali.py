"""The DALI section of `bench gpu`: the pipeline alone over the generated files, with its configured settings
and with one setting changed at a time (the measurement that picks the DALI defaults)."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator

import torch

from configs.schema import DataConfig
from launch.bench import synchronize
from launch.bench.gpu_watch import GpuWatch, Row


DALI_VARIANTS: dict[str, dict[str, object]] = {
    "hw_decoder_load 0.65": {"dali_hw_decoder_load": 0.65},
    "hw_decoder_load 0.9": {"dali_hw_decoder_load": 0.9},
    "hw_decoder_load 0.99": {"dali_hw_decoder_load": 0.99},
    "threads 4": {"dali_threads": 4},
    "threads 8": {"dali_threads": 8},
    "threads 12": {"dali_threads": 12},
    "prefetch 3": {"dali_prefetch_depth": 3},
    "prefetch 5": {"dali_prefetch_depth": 5},
    "memory padding 256 MB": {"dali_memory_padding_mb": 256},
    "full decode + slice": {"dali_decode": "full"},
    "reader threads 4": {"reader_threads": 4},
}
"""The DALI section's variants: one setting each, changed from the configured defaults (a variant that equals
them is left out)."""


def dali_variants(cfg: DataConfig) -> dict[str, dict[str, object]]:
    """The configured settings ("configured") and each variant of DALI_VARIANTS that differs from them."""
    variants: dict[str, dict[str, object]] = {"configured": {}}
    for name, changes in DALI_VARIANTS.items():
        if any(getattr(cfg, key) != value for key, value in changes.items()):
            variants[name] = changes
    return variants


def dali_alone_row(name: str, cfg: DataConfig, device: torch.device, *, steps: int, rounds: int) -> Row:
    """The DALI pipeline alone, no model: `rounds` timed rounds of `steps` batches after one warm-up round,
    epoch after epoch over the files. Notes the reader threads' CPU time per batch (the external source's
    preparation of files, windows and draws)."""
    from data_pipeline import build_loaders
    from data_pipeline.dali import DaliLoader

    loaders = build_loaders(cfg, seed=0, device=device, dtype=torch.float16)
    train = loaders.train
    assert isinstance(train, DaliLoader)

    def batches() -> Iterator[object]:
        for epoch in itertools.count():
            yield from train.iter_epoch(epoch)

    stream = batches()
    watch = GpuWatch(device)
    rates = []
    for round_ in range(rounds + 1):
        with watch.timed() if round_ else contextlib.nullcontext():
            start = time.perf_counter()
            for _ in range(steps):
                next(stream)
            synchronize(device)
            if round_:
                rates.append(steps * cfg.batch_size / (time.perf_counter() - start))
    reader_ms = 1000 * train.reader_cpu_s / max(1, train.reader_batches)
    return Row(name, rates, peak_memory_gb=watch.peak_memory_gb(), gpu_utilisation=watch.utilisation(),
               notes=f"reader CPU {reader_ms:.2f} ms/batch")
