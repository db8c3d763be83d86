"""The DALI loader: JPEG decoding, cropping, resizing and normalisation in a DALI pipeline, on the GPU
("mixed" decoder: nvJPEG, and the hardware JPEG decoder where the GPU has one) or on CPU threads.

The one module that imports DALI (`pip install 'resnet-train[dali]'`).

Which files each batch holds comes from `sharding.ShardedBatchSampler` and where each is cropped from
`augment.plan_batch`, both pure functions of (seed, epoch, sample); the pipeline gets the paths and windows
through an external source instead of DALI's file reader and random-crop operator. That is the resume
mechanism: `iter_epoch(epoch, start_batch)` reproduces any position of any epoch without replaying or
checkpointing reader and generator state, for any world size, and the baseline loader sees the very same
samples and windows. DALI's own threads read the files (`io.file.read`), and it decodes only the window
(`decoders.image_slice`, ROI decoding) as `decoders.image_random_crop` would (data.dali_decode).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from configs.schema import DataConfig
from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, BatchPlanner
from data_pipeline.auto_augment import (AUTO_AUGMENT_FILL, AUTO_AUGMENT_OPS, MAGNITUDE_RANGES, NUM_MAGNITUDE_BINS,
                                        num_auto_augment_ops)
from data_pipeline.index import DatasetError, SplitIndex
from data_pipeline.sharding import SampleKey, ShardedBatchSampler

if TYPE_CHECKING:
    from data_pipeline.shard_cache import ShardSource

Batch = tuple[torch.Tensor, torch.Tensor]
SourceBatch = tuple[list[np.ndarray] | np.ndarray, ...]
"""What the external source hands DALI for one batch: file paths (uint8), crop starts, crop shapes, flips, output
sizes (the same for the whole batch: the epoch's, with progressive resizing); with automatic augmentation
the operations, magnitude bins and signs of each image; with random erasing each image's box (anchor, shape).
"""


class BatchReader:
    """Prepares the external source's batches in order: on `num_threads` background threads, `lookahead`
    batches ahead of the requests, so that the training thread (which DALI calls the source on) only
    collects finished batches; with `num_threads=0` on the calling thread. The batches and their order are
    the same either way: only where the work happens differs."""

    def __init__(self, *, num_threads: int, lookahead: int) -> None:
        self.read: Callable[[list[SampleKey]], SourceBatch] = lambda keys: ()
        self.lookahead = lookahead
        self.pool = ThreadPoolExecutor(num_threads, thread_name_prefix="dali-reader") if num_threads else None
        self.keys: Iterator[list[SampleKey]] = iter(())
        self.ahead: deque[tuple[list[SampleKey], Future[SourceBatch]]] = deque()

    def start(self, keys: Iterator[list[SampleKey]], read: Callable[[list[SampleKey]], SourceBatch]) -> None:
        """Read the batches of `keys` with `read` next; what was read ahead of another position is dropped."""
        for _, future in self.ahead:
            future.cancel()
        self.ahead.clear()
        self.keys = keys
        self.read = read
        self._fill()

    def next(self) -> tuple[list[SampleKey], SourceBatch]:
        """The keys and contents of the next batch; StopIteration after the last."""
        if self.pool is None:
            keys = next(self.keys)
            return keys, self.read(keys)
        if not self.ahead:
            raise StopIteration
        keys, future = self.ahead.popleft()
        self._fill()
        return keys, future.result()

    def _fill(self) -> None:
        if self.pool is None:
            return
        while len(self.ahead) < self.lookahead and (keys := next(self.keys, None)) is not None:
            self.ahead.append((keys, self.pool.submit(self.read, keys)))


def _import_dali() -> Any:
    """The `nvidia.dali` package (typed loosely: its stubs do not describe its generated operators)."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn
        import nvidia.dali.types  # noqa: F401
    except ImportError as error:
        raise ImportError("data.loader='dali' needs NVIDIA DALI: install the extra dali "
                          "(pip install 'resnet-train[dali]'), or set data.loader=torch") from error
    return dali


def apply_auto_augment(images: Any, op: Any, magnitude_bin: Any, negate: Any, *, shape: Any,
                       cfg: DataConfig) -> Any:
    """The automatic augmentation of a batch of uint8 HWC images: for each level, DALI's auto_aug operation of
    each sample's `op` (indices into AUTO_AUGMENT_OPS, one per level) at its magnitude bin and sign, with the
    magnitude ranges of `auto_augment.MAGNITUDE_RANGES` (DALI's `select` runs each operation on its samples
    only). `shape`: the images' (height, width)."""
    from nvidia.dali.auto_aug import augmentations
    from nvidia.dali.auto_aug.core import select, signed_bin

    suite = []
    for name in AUTO_AUGMENT_OPS:
        low, high, signed = MAGNITUDE_RANGES[cfg.auto_augment][name]
        operation = getattr(augmentations, name)
        suite.append(operation if high == low else operation.augmentation(mag_range=(low, high),
                                                                           randomly_negate=signed))
    for level in range(num_auto_augment_ops(cfg)):
        images = select(suite, op[level], images, magnitude_bin=signed_bin(magnitude_bin[level], negate[level]),
                        num_magnitude_bins=NUM_MAGNITUDE_BINS, shape=shape, fill_value=AUTO_AUGMENT_FILL)
    return images


def dali_device_id(device: torch.device) -> int | None:
    """DALI's `device_id`: the training context's GPU, never local_rank or the current device (under Ray
    every worker sees all of a node's GPUs); None for a CPU-only pipeline."""
    if device.type != "cuda":
        return None
    if device.index is None:
        raise ValueError(f"{device}: a GPU pipeline needs the GPU's index (cuda:N)")
    return device.index


class DaliLoader:
    """One rank's batches from a DALI pipeline: NCHW channels-last views of NHWC `dtype` images on `device`,
    and int64 labels on the host."""

    def __init__(self, index: SplitIndex, cfg: DataConfig, *, train: bool, seed: int, rank: int,
                 world_size: int, device: torch.device, dtype: torch.dtype, source: ShardSource | None = None) -> None:
        self.index = index
        self.source = source
        """A packed data set's shards, which the reader threads read the encoded images from; None: files."""
        self.cfg = cfg
        self.train = train
        self.device = device
        self.dtype = dtype
        self.sampler = ShardedBatchSampler(len(index.samples), batch_size=cfg.batch_size, rank=rank,
                                           world_size=world_size, seed=seed, train=train,
                                           order=source.order if source is not None else None,
                                           repeats=cfg.repeated_augmentation)
        self.reader = BatchReader(num_threads=cfg.reader_threads, lookahead=cfg.reader_lookahead)
        self.planner = BatchPlanner(index, cfg, train=train)
        # Labels and full paths once, so that a batch is read without per-sample Python objects.
        self.labels = torch.tensor([sample.label for sample in index.samples], dtype=torch.int64)
        # Each file's path, encoded as DALI's file reader takes it (bytes as a uint8 array).
        self.paths = [] if source is not None else [np.frombuffer(str(index.root / sample.path).encode(),
                                                                                  dtype=np.uint8)
                                                     for sample in index.samples]
        self.reader_cpu_s = 0.0
        """CPU time the batches' preparation (`_read_batch`) took so far, on whichever threads ran it."""
        self.reader_batches = 0
        """Batches prepared so far."""
        self._reader_cpu_lock = threading.Lock()
        self._in_flight: deque[list[SampleKey]] = deque()
        self.auto_augment = train and cfg.auto_augment != "none"
        self.erasing = train and cfg.random_erasing_prob > 0
        self.pipeline = self._build_pipeline(seed)

    def __len__(self) -> int:
        return len(self.sampler)

    def _build_pipeline(self, seed: int) -> Any:
        dali = _import_dali()
        fn, types = dali.fn, dali.types

        gpu = self.device.type == "cuda"

        # Conditionals (DALI's `if` on data, which automatic augmentation uses) need a `pipeline_def`.
        @dali.pipeline_def(enable_conditionals=self.auto_augment)
        def graph() -> Any:
            dtypes = [types.UINT8, types.INT32, types.INT32, types.INT32, types.FLOAT]
            dtypes += [types.INT32] * 3 * self.auto_augment + [types.FLOAT] * 2 * self.erasing
            paths, start, shape, mirror, size, *extra = fn.external_source(
                source=self._next_batch, num_outputs=len(dtypes), batch=True, dtype=dtypes)
            # DALI's own threads read the files (in C++, beside the decoding), not the Python reader threads;
            # from shards the reader threads read the encoded images themselves.
            encoded = paths if self.source is not None else fn.io.file.read(paths)
            # EXIF orientation is ignored, as by PIL and torchvision: crop windows are in stored pixels.
            decoding = {"output_type": types.RGB, "adjust_orientation": False, **self._gpu_decoder_options()}
            if self.cfg.dali_decode == "roi":
                images = fn.decoders.image_slice(encoded, start=start, shape=shape, device="mixed" if gpu else "cpu",
                                                 **decoding)
            else:
                images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", **decoding)
                images = fn.slice(images, start=start, shape=shape, axis_names="WH")
            images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
            if self.auto_augment:
                op, magnitude_bin, negate, *extra = extra
                images = apply_auto_augment(images, op, magnitude_bin, negate, shape=size, cfg=self.cfg)
            images = fn.crop_mirror_normalize(
                images, mirror=mirror, output_layout="HWC",
                dtype=types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT,
                mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])
            if self.erasing:
                anchor, erase_shape = extra
                images = fn.erase(images, anchor=anchor, shape=erase_shape, axis_names="HW", fill_value=0)
            return images

        pipeline = graph(batch_size=self.cfg.batch_size, num_threads=self.cfg.dali_threads,
                         device_id=dali_device_id(self.device), seed=seed,
                         prefetch_queue_depth=self.cfg.dali_prefetch_depth, exec_dynamic=True)
        pipeline.build()
        return pipeline

    def _gpu_decoder_options(self) -> dict[str, Any]:
        """The mixed decoder's settings from the config (none for the CPU decoder, which has no use for them)."""
        if self.device.type != "cuda":
            return {}
        options: dict[str, Any] = {"hw_decoder_load": self.cfg.dali_hw_decoder_load}
        if self.cfg.dali_memory_padding_mb is not None:
            padding = self.cfg.dali_memory_padding_mb * 2**20
            options.update(device_memory_padding=padding, host_memory_padding=padding)
        return options

    def _next_batch(self) -> SourceBatch:
        """DALI's source, called on the thread that runs the pipeline (ahead of the batches it returns, for
        its prefetch queue): the next batch from the reader; StopIteration ends the epoch."""
        keys, batch = self.reader.next()
        self._in_flight.append(keys)
        return batch

    def _read_batch(self, keys: list[SampleKey], *, size: int) -> SourceBatch:
        """The file paths, crop windows and flips of one batch, to be resized to `size` (on a reader thread):
        numpy over the whole batch (`plan_batch`); DALI reads the files."""
        cpu_start = time.thread_time()
        indices, plan = self.planner.plan(keys, size=size)
        paths = (self.source.read_batch(indices.tolist()) if self.source is not None
                 else [self.paths[index] for index in indices.tolist()])
        crops = plan.crops
        # Dense arrays: DALI's external source takes a batch as one array whose first axis is the sample.
        batch: SourceBatch = (paths, np.stack([crops.left, crops.top], axis=1).astype(np.int32),
                              np.stack([crops.width, crops.height], axis=1).astype(np.int32),
                              crops.flip.astype(np.int32), np.full((len(keys), 2), size, dtype=np.float32))
        if plan.auto_augment is not None:
            batch += (plan.auto_augment.op, plan.auto_augment.magnitude_bin, plan.auto_augment.negate)
        if plan.erase_boxes is not None:
            # DALI's erase takes (anchor, shape) per image; an image that is not erased has an empty box.
            batch += (plan.erase_boxes[:, :2].astype(np.float32), plan.erase_boxes[:, 2:].astype(np.float32))
        with self._reader_cpu_lock:
            self.reader_cpu_s += time.thread_time() - cpu_start
            self.reader_batches += 1
        return batch

    def _restart(self, keys: Iterator[list[SampleKey]], *, size: int) -> None:
        """Discard what an unfinished epoch left in flight, then make `keys`, resized to `size`, the pipeline's
        next epoch."""
        self.reader.start(iter(()), self._read_batch_of(size))
        while True:
            try:
                self.pipeline.outputs()
            except StopIteration:
                break
        self.pipeline.schedule_run()  # lets the source report the end, so that reset() rewinds
        self.pipeline.reset()
        self._in_flight.clear()
        self.reader.start(keys, self._read_batch_of(size))

    def _read_batch_of(self, size: int) -> Callable[[list[SampleKey]], SourceBatch]:
        return functools.partial(self._read_batch, size=size)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of epoch `epoch` from batch `start_batch` on; the same for the same arguments."""
        if self.source is not None:
            self.source.schedule(self.sampler.upcoming(epoch, start_batch))
        return self._batches(self.sampler.batches(epoch, start_batch), size=self.cfg.crop_size(train=self.train,
                                                                                                epoch=epoch))

    def _batches(self, keys: Iterator[list[SampleKey]], *, size: int) -> Iterator[Batch]:
        self._restart(keys, size=size)
        self.pipeline.schedule_run()
        while True:
            try:
                (output,) = self.pipeline.outputs()
            except StopIteration:
                return
            except RuntimeError as error:
                raise self._decode_error(error) from error
            batch_keys = self._in_flight.popleft()
            images = self._as_torch(output.as_tensor())
            labels = self.labels[[index for index, _ in batch_keys]]
            self.pipeline.schedule_run()  # the next batch decodes while the model trains on this one
            yield images.permute(0, 3, 1, 2), labels

    def _as_torch(self, tensor: Any) -> torch.Tensor:
        """The batch as a torch tensor over DALI's own buffer, no copy: under DALI's dynamic executor
        (`exec_dynamic`) an output buffer is not reused while something holds it. On a GPU, DLPack makes the
        training device's current stream wait for DALI's work on the buffer, as DALI's own PyTorch iterator
        does."""
        if self.device.type != "cuda":
            return torch.from_dlpack(tensor)
        with torch.cuda.device(self.device):
            return torch.from_dlpack(tensor)

    def _decode_error(self, error: RuntimeError) -> Exception:
        """DALI's decode errors do not name the file: find it among the batches in flight."""
        from data_pipeline.prepare import check_image

        if self.source is not None:  # shards are checked against their manifest before they are read
            return error
        for batch_keys in self._in_flight:
            for index, _ in batch_keys:
                path = self.index.root / self.index.samples[index].path
                if isinstance(reason := check_image(str(path)), str):
                    return DatasetError(f"{path}: {reason}; it changed after `data prepare` indexed it: run "
                                        "`python -m launch data prepare` again")
        return error
