"""`bench data --streaming`: one loader over the same JPEGs read from a local folder, from packed shards on local
disk, and streamed from an S3 server (a cold cache each round; warm caches limited to 100%, 50% and 25% of the
set), alternating round by round: images/s, the ratio to the folder, and the bytes fetched per epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from configs.schema import DataConfig
from launch.bench import paired_ratios, ratio_cell, spread, trust_warning

CACHE_SHARES = {"s3-warm-100%": 1.0, "s3-50%": 0.5, "s3-25%": 0.25}
"""Streaming variants with a cache kept across rounds -> the cache limit as a share of the training set (the
untimed first epoch fills it: at 100% nothing is fetched after it)."""


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout_s: float = 60) -> None:
    """Return once something accepts connections on 127.0.0.1:`port`; RuntimeError naming `what` if `process`
    ends first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


def s3_environment(endpoint: str) -> dict[str, str]:
    """The AWS environment variables that point s3:// URLs (through s3fs and botocore) at a local test server."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def local_s3_server(port: int | None = None) -> Iterator[str]:
    """A real S3-compatible server (moto's standalone server, `pip install 'moto[server]'`) on 127.0.0.1 (at
    `port`, default a free one) until the block ends, with the AWS environment variables of this process
    pointing s3:// URLs at it; yields its endpoint URL."""
    import s3fs

    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = dict(os.environ)
    try:
        wait_for_port(port, server, "moto's S3 server (is moto[server] installed?)")
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(s3_environment(endpoint))
        s3fs.S3FileSystem.clear_instance_cache()  # s3fs keeps clients per process, made with the old settings
        yield endpoint
    finally:
        os.environ.clear()
        os.environ.update(saved)
        s3fs.S3FileSystem.clear_instance_cache()
        server.terminate()
        server.wait(timeout=30)


@dataclass(frozen=True, slots=True)
class StreamingBench:
    """Images/s and bytes fetched of each source, per round."""

    num_images: int
    set_bytes: int
    """Bytes of the training shards."""
    num_shards: int
    block_shards: int
    loader: str
    s3: str
    images_per_s: dict[str, list[float]]
    fetched_bytes: dict[str, list[float]]
    """Streaming variant -> bytes its cache fetched in each round's epoch."""

    def round_ratios(self, variant: str) -> list[float]:
        return paired_ratios(self.images_per_s[variant], self.images_per_s["folder"])

    def as_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def table(self) -> str:
        rows = [f"bench data --streaming: {self.num_images} training images, {self.set_bytes / 1e6:.1f} MB in "
                f"{self.num_shards} shards, blocks of {self.block_shards}, loader {self.loader}, S3: {self.s3}, "
                f"{len(self.images_per_s['folder'])} rounds",
                f"{'source':<14} {'images/s':>22} {'/ folder (95% interval)':>24} {'fetched per epoch':>20}"]
        for variant, values in self.images_per_s.items():
            ratio = ratio_cell(self.round_ratios(variant))
            fetched = self.fetched_bytes.get(variant)
            share = f"{statistics.median(fetched) / self.set_bytes:.0%} of the set" if fetched else "-"
            rows.append(f"{variant:<14} {spread(values):>22} {ratio:>24} {share:>20}")
        ratios = {f"{variant} / folder": self.round_ratios(variant) for variant in self.images_per_s
                  if variant != "folder"}
        if (warning := trust_warning(ratios)) is not None:
            rows.append(warning)
        return "\n".join(rows)


def bench_streaming(cfg: DataConfig, *, rounds: int, scratch: Path, shard_mb: float, s3_bucket: str) -> StreamingBench:
    """Time whole training epochs of `cfg`'s loader over the indexed folder `cfg.root`, over its shards on local
    disk, and streamed from `s3_bucket`, alternating round by round after one untimed epoch each."""
    import s3fs

    from data_pipeline import build_loaders
    from data_pipeline.shard_cache import ShardCache
    from data_pipeline.shards import pack_dataset

    shards = pack_dataset(cfg.root, str(scratch / "shards"), shard_mb=shard_mb, log=lambda line: None)
    url = f"{s3_bucket.rstrip('/')}/bench-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().put(str(scratch / "shards"), url, recursive=True)
    set_bytes = sum(shard.num_bytes for shard in shards["train"])
    configs = {"folder": cfg, "shards-local": dataclasses.replace(cfg, root=str(scratch / "shards")),
               "s3-cold": dataclasses.replace(cfg, root=url, stage_dir=str(scratch / "cache-cold"))}
    for variant, share in CACHE_SHARES.items():
        configs[variant] = dataclasses.replace(cfg, root=url, stage_dir=str(scratch / f"cache-{variant}"),
                                               cache_limit_gb=share * set_bytes / 1e9)
    loaders = {variant: build_loaders(variant_cfg, seed=0).train for variant, variant_cfg in configs.items()}
    images_per_s: dict[str, list[float]] = {variant: [] for variant in loaders}
    fetched: dict[str, list[float]] = {variant: [] for variant in loaders if variant.startswith("s3")}
    for round_ in range(rounds + 1):
        for variant, loader in loaders.items():
            cache = getattr(getattr(loader, "source", None), "where", None)
            if variant == "s3-cold" and isinstance(cache, ShardCache):  # empty: every shard is fetched in the epoch
                shutil.rmtree(cache.folder, ignore_errors=True)
                cache.folder.mkdir(parents=True)
            fetched_before = cache.fetched_bytes if isinstance(cache, ShardCache) else 0
            start = time.perf_counter()
            images = sum(images.shape[0] for images, _ in loader.iter_epoch(round_))
            if round_ > 0:
                images_per_s[variant].append(images / (time.perf_counter() - start))
                if isinstance(cache, ShardCache):
                    fetched[variant].append(cache.fetched_bytes - fetched_before)
    return StreamingBench(num_images=len(loaders["folder"]) * cfg.batch_size, set_bytes=set_bytes,
                          num_shards=len(shards["train"]), block_shards=cfg.shuffle_block_shards, loader=cfg.loader,
                          s3=url, images_per_s=images_per_s, fetched_bytes=fetched)


def bench_streaming_command(cfg: DataConfig, *, rounds: int, scratch: Path, as_json: bool) -> str:
    """`bench_streaming` with 16 training shards, against a local S3 server (moto) started for it."""
    import s3fs

    from data_pipeline.prepare import INDEX_FOLDER, read_index

    total = sum(sample.num_bytes for sample in read_index(Path(cfg.root) / INDEX_FOLDER, Path(cfg.root),
                                                          "train").samples)
    with local_s3_server():
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem().mkdir(bucket)
        result = bench_streaming(dataclasses.replace(cfg, shuffle_block_shards=2), rounds=rounds, scratch=scratch,
                                 shard_mb=total / 16 / 1e6, s3_bucket=f"s3://{bucket}")
    return result.as_json() if as_json else result.table()
