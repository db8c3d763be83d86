"""The `bench ...` commands: each measures one thing and prints a table (or with --json one JSON line)."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

from configs.errors import ConfigError
from configs.extras import modules_of, require_extras
from configs.loader import load_config
from configs.schema import CompileMode, DataConfig, ModelName
from launch.cli import JSON_ARGUMENT, arg, command, config_arguments


@command("bench step", "the engine's training step against a bare PyTorch loop, on synthetic device-resident data",
         *config_arguments(),
         arg("--steps", type=int, default=10, help="timed steps per variant per round (default: 10)"),
         arg("--rounds", type=int, default=15, help="alternating rounds of both variants (default: 15)"),
         JSON_ARGUMENT)
def bench_step(args: argparse.Namespace) -> None:
    from launch.bench.step import bench_step

    if args.steps < 1 or args.rounds < 1:
        raise ConfigError(f"--steps={args.steps} and --rounds={args.rounds} must both be >= 1")
    result = bench_step(load_config(args.config, args.overrides), steps=args.steps, rounds=args.rounds)
    print(result.as_json() if args.json else result.table())


@command("bench accuracy", "time to a val top-1 target for variants of a recipe, side by side in one invocation",
         *config_arguments(),
         arg("--target", type=float, default=0.98, help="val top-1 to reach (default: 0.98)"),
         arg("--variant", action="append", default=None, metavar="NAME=OVERRIDE[,OVERRIDE...]",
             help="a variant to run (repeatable; the first is the reference; an empty list of overrides is the "
                  "recipe as it is); default: the set --set names"),
         arg("--set", dest="variant_set", choices=("resizing", "levers"), default="resizing",
             help="the built-in variants of the quickstart: resizing (with and without progressive resizing, the "
                  "default) or levers (AdamW, LAMB + BCE, stochastic depth, repeated augmentation, clipping)"),
         JSON_ARGUMENT)
def bench_accuracy(args: argparse.Namespace) -> None:
    from launch.bench.accuracy import VARIANT_SETS, as_json, bench_accuracy, table
    from launch.bench.gpu_watch import machine_facts
    from trainer.dist import single_process_context

    if not 0 < args.target <= 1:
        raise ConfigError(f"--target={args.target} must be in (0, 1]")
    variants = dict(VARIANT_SETS[args.variant_set])
    if args.variant:
        variants = {}
        for given in args.variant:
            name, equals, changes = given.partition("=")
            if not equals or not name:
                raise ConfigError(f"--variant {given!r}: expected NAME=OVERRIDE[,OVERRIDE...]")
            variants[name] = tuple(change for change in changes.split(",") if change)
    rows = bench_accuracy(args.config, args.overrides, target=args.target, variants=variants)
    device = single_process_context().device
    print(as_json(rows) if args.json else table(rows, config=args.config, machine=machine_facts(device)["device"]))


@command("bench infer", "inference latency (p50/p95/p99) and images/s of eager PyTorch, torch.export and "
         "onnxruntime on this CPU, side by side in one run",
         *config_arguments(what="YAML recipe whose model and evaluation size are measured"),
         arg("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default: 1,8,32)"),
         arg("--iterations", type=int, default=30, help="timed calls per runtime and batch size (default: 30)"),
         arg("--warmup", type=int, default=3, help="untimed calls first (default: 3)"),
         JSON_ARGUMENT)
def bench_infer(args: argparse.Namespace) -> None:
    from launch.bench.infer import bench_infer

    try:
        batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--batch-sizes={args.batch_sizes!r}: expected integers separated by commas") from None
    if not batch_sizes or min(batch_sizes) < 1 or args.iterations < 1 or args.warmup < 0:
        raise ConfigError(f"--batch-sizes={args.batch_sizes!r} must be >= 1, --iterations={args.iterations} >= 1 "
                          f"and --warmup={args.warmup} >= 0")
    require_extras(modules_of("onnx"))
    result = bench_infer(load_config(args.config, args.overrides), batch_sizes=batch_sizes,
                         iterations=args.iterations, warmup=args.warmup)
    print(result.as_json() if args.json else result.table())


@command("bench data", "images/s of the DALI pipeline against the baseline DataLoader on the same JPEG files",
         arg("--root", default=None, help="an indexed ImageNet-layout tree to read (default: generate --images JPEGs)"),
         arg("--images", type=int, default=512, help="generated training images, 500x375 px at quality 90 "
                                                      "(default: 512)"),
         arg("--batch-size", type=int, default=64, help="images per batch (default: 64)"),
         arg("--num-workers", type=int, default=2,
             help="DataLoader processes and DALI threads, the same for both (default: 2)"),
         arg("--reader-threads", type=int, default=DataConfig().reader_threads,
             help=f"DALI reader threads (default: {DataConfig().reader_threads})"),
         arg("--image-size", type=int, default=224, help="crop side in pixels (default: 224)"),
         arg("--rounds", type=int, default=15, help="timed epochs per loader, interleaved (default: 15)"),
         arg("--streaming", action="store_true",
             help="then the same files as a folder, as shards on local disk and streamed from a local S3 server "
                  "(moto) with a cold cache, a warm one and cache limits of 50%% and 25%% of the set"),
         JSON_ARGUMENT)
def bench_data(args: argparse.Namespace) -> None:
    from launch.bench.data import bench_data_command

    print(bench_data_command(root=args.root, num_images=args.images, batch_size=args.batch_size,
                             num_workers=args.num_workers, reader_threads=args.reader_threads,
                             image_size=args.image_size, rounds=args.rounds, as_json=args.json,
                             streaming=args.streaming))


@command("bench train", "end-to-end images/s of a whole training run (per device, all devices, MFU on GPUs)",
         *config_arguments(), JSON_ARGUMENT)
def bench_train(args: argparse.Namespace) -> None:
    from launch.bench.train import bench_train

    measured = bench_train(load_config(args.config, args.overrides), config_name=args.config)
    if measured is None:  # not the primary process of a torchrun job: rank 0 reports
        return
    (Path(measured.run_dir) / "bench.json").write_text(measured.as_json() + "\n")
    print(measured.as_json() if args.json else f"{measured.table()}\n(also in {measured.run_dir}/bench.json)")


@command("bench launch", "time to first step under torchrun and Ray, and Ray's restart latency after a worker dies",
         arg("--workers", type=int, default=2, help="training processes (default: 2)"),
         JSON_ARGUMENT)
def bench_launch(args: argparse.Namespace) -> None:
    import tempfile

    from data_pipeline.digits import render_digits
    from launch.bench.launch_time import bench_launch

    with tempfile.TemporaryDirectory(prefix="bench-launch-") as scratch:
        digits = render_digits(Path(scratch) / "digits")
        launched = bench_launch(data_root=str(digits), scratch=Path(scratch) / "runs", workers=args.workers)
    print(launched.as_json() if args.json else launched.table())


@command("bench elastic", "what a shrink and a grow of an elastic Ray run cost, on a two-node cluster on this machine",
         arg("--resize-interval-s", type=float, default=5.0,
             help="launch.resize_interval_s of the run (default: 5; the config's default is 60)"),
         arg("--group-start-timeout-s", type=float, default=60.0,
             help="launch.group_start_timeout_s of the run (default: 60, the config's and Ray's)"),
         JSON_ARGUMENT)
def bench_elastic(args: argparse.Namespace) -> None:
    import tempfile

    from data_pipeline.digits import render_digits
    from launch.bench.elastic import bench_elastic

    if args.resize_interval_s <= 0 or args.group_start_timeout_s <= 0:
        raise ConfigError(f"--resize-interval-s={args.resize_interval_s} and --group-start-timeout-s="
                          f"{args.group_start_timeout_s} must be > 0")
    require_extras(["ray"])
    with tempfile.TemporaryDirectory(prefix="bench-elastic-") as scratch:
        digits = render_digits(Path(scratch) / "digits")
        measured = bench_elastic(data_root=str(digits), scratch=Path(scratch) / "runs",
                                 resize_interval_s=args.resize_interval_s,
                                 group_start_timeout_s=args.group_start_timeout_s)
    print(measured.as_json() if args.json else measured.table())


@command("bench gpu", "measure a GPU node: bare step, engine, DALI mixed, DataLoader, side by side (tiny on a CPU)",
         arg("--out", required=True, help="folder for bench_gpu.json, bench_gpu.md and the generated JPEG files"),
         arg("--model", default=None, choices=typing.get_args(ModelName), help="network (default: resnet50 on a GPU)"),
         arg("--batch-size", type=int, default=None, help="images per step (default: 256 on a GPU)"),
         arg("--steps", type=int, default=None, help="steps per timed round (default: 30 on a GPU)"),
         arg("--rounds", type=int, default=None, help="timed rounds per row (default: 3 on a GPU)"),
         arg("--images", type=int, default=None, help="generated JPEG files (default: 20000 on a GPU)"),
         arg("--compile-modes", default=None,
             help="torch.compile modes of the compiled bare-step rows, comma-separated (default: "
                  "default,reduce-overhead; max-autotune compiles for many minutes)"),
         JSON_ARGUMENT)
def bench_gpu(args: argparse.Namespace) -> None:
    from launch.bench.gpu import bench_gpu

    given = {"batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "images": args.images}
    for name, value in given.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value} must be >= 1")
    changes: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    if args.model is not None:
        changes["model"] = args.model
    if args.compile_modes is not None:
        modes = tuple(mode for mode in args.compile_modes.split(",") if mode)
        known = typing.get_args(CompileMode)
        if unknown := [mode for mode in modes if mode not in known]:
            raise ConfigError(f"--compile-modes: unknown mode {unknown[0]!r} (known: {', '.join(known)})")
        changes["compile_modes"] = modes
    result = bench_gpu(Path(args.out), changes, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(result.as_json() if args.json else f"{result.table()}\n(also in {args.out}/bench_gpu.json and .md)")
