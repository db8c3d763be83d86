"""`python -m launch <command>`: train, bench, and data preparation."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from configs.loader import ConfigError, dump_config, load_config

DEFAULT_CONFIG = "quickstart"
"""The recipe `train` runs when no --config is given: the embedded defaults a new user starts from."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    parser = argparse.ArgumentParser(prog="python -m launch", description="Train ResNet image classifiers.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a config and overrides")
    train.add_argument("--config", default=DEFAULT_CONFIG,
                       help=f"YAML recipe: a path, or the name of one in configs/ (default: {DEFAULT_CONFIG})")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="dotted overrides applied after the file, e.g. optim.lr=0.4 data.batch_size=128")

    bench = commands.add_parser("bench", help="measure throughput")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    step = bench_commands.add_parser(
        "step", help="the engine's training step against a bare PyTorch loop, on synthetic device-resident data")
    step.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML recipe (default: {DEFAULT_CONFIG})")
    step.add_argument("--steps", type=int, default=20, help="timed steps per variant per round (default: 20)")
    step.add_argument("--rounds", type=int, default=3, help="alternating rounds of both variants (default: 3)")
    step.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    step.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")

    data = commands.add_parser("data", help="prepare data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser(
        "prepare", help="decode every file of an ImageNet-layout tree and write the index training reads")
    prepare.add_argument("root", help="folder holding train/<class>/* and val/<class>/*")
    prepare.add_argument("--out", default=None, help="index folder (default: ROOT/index; set data.index_dir to it)")
    prepare.add_argument("--num-workers", type=int, default=None, help="decoding processes (default: all cores)")
    digits = data_commands.add_parser("digits", help="render the built-in digits set as an ImageNet-layout JPEG tree")
    digits.add_argument("--out", required=True, help="folder to create (left as it is if already complete)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m launch` and the `resnet-train` console script.

    Exit status: 0 done, 2 bad input (config, data, paths), 3 training diverged (non-finite losses),
    75 preempted by SIGTERM after a checkpoint (requeue to resume).
    """
    from data_pipeline import DatasetError
    from trainer.loop import TrainingDiverged
    from trainer.preempt import EXIT_PREEMPTED, Preempted

    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            cfg = load_config(args.config, args.overrides)
            if args.print_config:
                print(dump_config(cfg), end="")
                return 0
            from launch.local import run_local

            run_local(cfg)
        elif args.command == "bench":
            from launch.bench import bench_step

            if args.steps < 1 or args.rounds < 1:
                raise ConfigError(f"--steps={args.steps} and --rounds={args.rounds} must both be >= 1")
            result = bench_step(load_config(args.config, args.overrides), steps=args.steps, rounds=args.rounds)
            print(result.as_json() if args.json else result.table())
        elif args.command == "data":
            from launch.data import prepare_command, render_digits_command

            if args.data_command == "prepare":
                prepare_command(args.root, out=args.out, num_workers=args.num_workers)
            else:
                render_digits_command(args.out)
    except (ConfigError, DatasetError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 3
    except Preempted as error:
        print(f"preempted: {error}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0
