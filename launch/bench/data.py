"""`bench data`: the DALI pipeline (CPU threads; and the mixed GPU decoder when there is a GPU) against the
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

import torch

from configs.schema import DataConfig

from launch.bench import paired_ratios, ratio_cell, spread, synchronize, trust_warning


@dataclass(frozen=True, slots=True)
class DataBench:
    """What each loader delivered over whole training epochs of the same files, per round."""

    num_images: int
    image_size: int
    batch_size: int
    num_workers: int
    """DataLoader processes for the baseline, DALI CPU threads for DALI."""
    reader_threads: int
    """DALI's reader threads (the files and crops of upcoming batches), for the variants that have them."""
    dtype: str
    source: str
    """Where the JPEG files came from."""
    images_per_s: dict[str, list[float]]
    """Variant -> images/s of each timed round. torch: the DataLoader; dali-cpu: DALI on CPU threads, files
    read by the reader threads; dali-cpu-inline: the same with the files read on the calling thread (what
    DALI's plain external source does); dali-mixed (GPUs): nvJPEG decoding."""
    loader_cpu_ms_per_batch: dict[str, list[float]]
    """Variant -> CPU time the calling (training) thread spent inside the loader per batch, each round."""
    loader_wall_ms_per_batch: dict[str, list[float]]
    """Variant -> wall time the calling thread spent inside the loader per batch (work plus waiting)."""
    reader_cpu_ms_per_batch: dict[str, list[float]]
    """DALI variant -> CPU time the preparation of each batch's external-source input took (files, crop
    windows, flips, augmentation draws), on whichever thread ran it, each round."""

    def round_ratios(self, variant: str) -> list[float]:
        """Images/s of `variant` over the baseline's, round by round (they ran back to back)."""
        return paired_ratios(self.images_per_s[variant], self.images_per_s["torch"])

    def ratio(self, variant: str) -> float:
        """The median of the rounds' ratios to the baseline."""
        return statistics.median(self.round_ratios(variant))

    def as_json(self) -> str:
        """One machine-readable line."""
        record = dataclasses.asdict(self)
        record["over_torch"] = {variant: self.ratio(variant) for variant in self.images_per_s}
        return json.dumps(record)

    def table(self) -> str:
        """The human-readable report: median (min-max) of the rounds."""
        rows = [f"bench data: {self.num_images} images ({self.source}) -> {self.image_size}px {self.dtype}, "
                f"batch {self.batch_size}, {self.num_workers} workers/threads, {self.reader_threads} DALI reader "
                f"threads, training crops, {len(self.images_per_s['torch'])} rounds",
                f"{'loader':<16} {'images/s':>22} {'/ torch (95% interval)':>24} "
                f"{'training thread in loader, ms/batch':>38} {'DALI reader CPU':>18}",
                f"{'':<16} {'':>22} {'':>24} {'CPU':>18} {'wall':>19} {'ms/batch':>18}"]
        for variant, values in self.images_per_s.items():
            ratio = ratio_cell(self.round_ratios(variant))
            reader = self.reader_cpu_ms_per_batch.get(variant)
            rows.append(f"{variant:<16} {spread(values):>22} {ratio:>24} "
                        f"{spread(self.loader_cpu_ms_per_batch[variant]):>18} "
                        f"{spread(self.loader_wall_ms_per_batch[variant]):>19} "
                        f"{spread(reader) if reader else '-':>18}")
        ratios = {f"{variant} / torch": self.round_ratios(variant) for variant in self.images_per_s
                  if variant != "torch"}
        if (warning := trust_warning(ratios)) is not None:
            rows.append(warning)
        return "\n".join(rows)


def write_photo_like_jpegs(root: Path, *, num_images: int, size: tuple[int, int] = (500, 375), quality: int = 90,
                           num_classes: int = 10, seed: int = 0, num_processes: int = 1) -> None:
    """`num_images` JPEGs of `size` at `quality` in an ImageNet-layout tree (train/ and a one-image-per-class
    val/), with smooth colour fields plus grain, so they compress like photographs (about 60-120 kB at
    500x375, quality 90), not like flat colour or white noise. Each file depends only on (seed, its number),
    so `num_processes` changes only how fast they are written."""
    jobs = []
    for i in range(num_images + num_classes):
        split, label = ("train", i % num_classes) if i < num_images else ("val", i - num_images)
        jobs.append((root / split / f"class_{label:03d}" / f"{i:06d}.JPEG", size, quality, (seed, i)))
    if num_processes <= 1:
        for job in jobs:
            _write_photo_like_jpeg(*job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Fresh processes, not forks of this one (which may hold CUDA or DALI threads).
    with ProcessPoolExecutor(num_processes, mp_context=multiprocessing.get_context("forkserver")) as pool:
        list(pool.map(_write_photo_like_jpeg, *zip(*jobs, strict=True), chunksize=64))


def _write_photo_like_jpeg(path: Path, size: tuple[int, int], quality: int, seed: tuple[int, int]) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    coarse = Image.fromarray(rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(path, quality=quality)


def bench_data(cfg: DataConfig, *, rounds: int, variants: list[str], source: str) -> DataBench:
    """Time whole training epochs of each loader variant over the indexed data set at `cfg.root`, alternating
    variants round by round after one untimed warm-up epoch each (worker start-up, pipeline build). Also
    times what the calling thread spends inside the loader (its CPU time and wall time per batch): on a
    GPU that thread launches the kernels."""
    from data_pipeline import build_loaders
    from data_pipeline.dali import DaliLoader
    from trainer.dist import single_process_context

    gpu = single_process_context().device
    device_of = {"torch": torch.device("cpu"), "dali-cpu": torch.device("cpu"),
                 "dali-cpu-inline": torch.device("cpu"), "dali-mixed": gpu}
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    loaders = {}
    for variant in variants:
        loader_cfg = dataclasses.replace(cfg, loader="torch" if variant == "torch" else "dali",
                                         reader_threads=0 if variant == "dali-cpu-inline" else cfg.reader_threads)
        loaders[variant] = build_loaders(loader_cfg, seed=0, device=device_of[variant], dtype=dtype)
    images_per_s: dict[str, list[float]] = {variant: [] for variant in variants}
    cpu_ms: dict[str, list[float]] = {variant: [] for variant in variants}
    wall_ms: dict[str, list[float]] = {variant: [] for variant in variants}
    reader_ms: dict[str, list[float]] = {variant: [] for variant in variants if variant != "torch"}
    for round_ in range(rounds + 1):
        for variant, built in loaders.items():
            device = device_of[variant]
            start = time.perf_counter()
            images = batches = 0
            inside_cpu_s = inside_wall_s = 0.0
            train = built.train
            reader_start = (train.reader_cpu_s, train.reader_batches) if isinstance(train, DaliLoader) else None
            iterator = train.iter_epoch(round_)
            while True:
                cpu_start, wall_start = time.thread_time(), time.perf_counter()
                batch = next(iterator, None)
                inside_cpu_s += time.thread_time() - cpu_start
                inside_wall_s += time.perf_counter() - wall_start
                if batch is None:
                    break
                images += batch[0].shape[0]
                batches += 1
            synchronize(device)
            if round_ > 0:
                images_per_s[variant].append(images / (time.perf_counter() - start))
                cpu_ms[variant].append(1000 * inside_cpu_s / batches)
                wall_ms[variant].append(1000 * inside_wall_s / batches)
                if isinstance(train, DaliLoader) and reader_start is not None:
                    reader_ms[variant].append(1000 * (train.reader_cpu_s - reader_start[0])
                                              / max(1, train.reader_batches - reader_start[1]))
    return DataBench(num_images=built.num_train_images, image_size=cfg.image_size, batch_size=cfg.batch_size,
                     num_workers=cfg.loader_workers, reader_threads=cfg.reader_threads,
                     dtype=str(dtype).removeprefix("torch."), source=source, images_per_s=images_per_s,
                     loader_cpu_ms_per_batch=cpu_ms, loader_wall_ms_per_batch=wall_ms,
                     reader_cpu_ms_per_batch=reader_ms)


def bench_data_command(*, root: str | None, num_images: int, batch_size: int, num_workers: int,
                       reader_threads: int, image_size: int, rounds: int, as_json: bool,
                       streaming: bool = False) -> str:
    """Run `bench data` on `root` (or on `num_images` generated JPEGs in a temporary folder) and return
    its report; with `streaming`, the report of `bench_streaming` on the same files after it."""
    import tempfile

    from configs.errors import ConfigError
    from data_pipeline.prepare import prepare_index

    if min(num_images, batch_size, num_workers, rounds, reader_threads) < 1:
        raise ConfigError(f"--images={num_images}, --batch-size={batch_size}, --num-workers={num_workers}, "
                          f"--reader-threads={reader_threads} and --rounds={rounds} must all be >= 1")
    variants = ["torch", "dali-cpu", "dali-cpu-inline", *(["dali-mixed"] if torch.cuda.is_available() else [])]
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        if root is None:
            root = scratch
            write_photo_like_jpegs(Path(root), num_images=num_images)
            prepare_index(root, num_workers=num_workers)
            source = f"generated 500x375 q90, {sum(p.stat().st_size for p in Path(root).rglob('*.JPEG')) / 1e6:.0f} MB"
        else:
            source = root
        # The same number of DALI threads and DataLoader processes: the comparison is per worker.
        cfg = DataConfig(dataset="folder", root=root, batch_size=batch_size, dali_threads=num_workers,
                         loader_workers=num_workers, reader_threads=reader_threads, image_size=image_size)
        result = bench_data(cfg, rounds=rounds, variants=variants, source=source)
        report = result.as_json() if as_json else result.table()
        if streaming:
            from launch.bench.streaming import bench_streaming_command

            report += "\n" + bench_streaming_command(cfg, rounds=rounds, scratch=Path(scratch), as_json=as_json)
    return report
