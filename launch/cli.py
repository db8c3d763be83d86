"""`python -m launch <command>`: train, eval, export, promote, bench, and data preparation.

Each command is one handler, registered with `@command` beside its arguments. A handler returns nothing;
whatever it raises that `launch.errors.EXIT_STATUSES` knows becomes a one-line message and that exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from configs.extras import require_extras
from configs.loader import dump_config, load_config
from configs.schema import RunConfig
from launch.errors import describe_exit_statuses, exit_status_of

DEFAULT_CONFIG = "quickstart"
"""The recipe `train` runs when no --config is given: the embedded defaults a new user starts from."""
GROUPS = {"bench": "measure throughput", "data": "prepare and pack data sets"}
"""Commands with sub-commands (`bench step`, `data prepare`), and their help."""


@dataclass(frozen=True, slots=True)
class Command:
    """One command: its words on the command line, its help, its arguments and its handler."""

    words: tuple[str, ...]
    help: str
    arguments: tuple[tuple[tuple[str, ...], dict[str, Any]], ...]
    handler: Callable[[argparse.Namespace], None]


COMMANDS: list[Command] = []
"""Every command, in the order of the help text."""


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One argument of a command, as `ArgumentParser.add_argument` takes it."""
    return flags, options


def command(words: str, help: str, *arguments: tuple[tuple[str, ...], dict[str, Any]]
            ) -> Callable[[Callable[[argparse.Namespace], None]], Callable[[argparse.Namespace], None]]:
    """Register the decorated function as the handler of `words` (e.g. "bench step") with `arguments`."""
    def register(handler: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
        COMMANDS.append(Command(tuple(words.split()), help, arguments, handler))
        return handler
    return register


def config_arguments(*, what: str = "YAML recipe") -> tuple[tuple[tuple[str, ...], dict[str, Any]], ...]:
    """--config and the dotted overrides, as every command that takes a run config has them."""
    return (arg("--config", default=DEFAULT_CONFIG,
                help=f"{what}: a path, or the name of one in configs/ (default: {DEFAULT_CONFIG})"),
            arg("overrides", nargs="*", metavar="section.key=value",
                help="dotted overrides applied after the file, e.g. optim.lr=0.4 data.batch_size=128"))


JSON_ARGUMENT = arg("--json", action="store_true", help="print one JSON line instead of the table")


@command("train", "train a model from a config and overrides",
         *config_arguments(),
         arg("--launcher", choices=["ray", "torchrun"], default=None,
             help="ray (default): Ray Train workers, restarted after failures; torchrun: this process, or each "
                  "process torchrun starts (sets launch.launcher)"),
         arg("--resume", metavar="RUN", default=None,
             help="continue a run from its latest checkpoint: its name under launch.runs_dir, 'latest', or its "
                  "folder (its saved config is used; overrides apply on top); or a checkpoint URL to start a new "
                  "run from"),
         arg("--print-config", action="store_true", help="print the resolved config and exit"))
def train(args: argparse.Namespace) -> None:
    from launch.orchestration import start_run

    overrides = [*args.overrides, *([f"launch.launcher={args.launcher}"] if args.launcher else [])]
    cfg = load_config(args.config, overrides)
    resume = False
    if args.resume is not None:
        cfg, resume = _resumed_config(cfg, args.resume, overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return
    require_extras(_extras_needed(cfg))
    start_run(cfg, resume=resume)


@command("data prepare", "decode every file of an ImageNet-layout tree and write the index training reads",
         arg("root", help="folder holding train/<class>/* and val/<class>/*"),
         arg("--out", default=None, help="index folder (default: ROOT/index; set data.index_dir to it)"),
         arg("--num-workers", type=int, default=None, help="decoding processes (default: all cores)"))
def data_prepare(args: argparse.Namespace) -> None:
    from data_pipeline.prepare import index_folder, prepare_index

    splits = prepare_index(args.root, out=args.out, num_workers=args.num_workers)
    folder = index_folder(args.root, args.out)
    for split, prepared in splits.items():
        classes = len({sample.label for sample in prepared.kept})
        print(f"{split}: {len(prepared.kept)} images in {classes} classes, {len(prepared.excluded)} files left out")
    print(f"index written to {folder}; files left out and why: {folder / 'excluded.txt'}")


@command("data pack", "pack an indexed ImageNet-layout tree into tar shards that training streams (from a URL)",
         arg("root", help="folder holding train/<class>/* and val/<class>/* (indexed first if it has no index)"),
         arg("--out", required=True, help="folder or URL (s3://bucket/imagenet-shards) to write the shards to; "
                                          "set data.root to it"),
         arg("--index-dir", default=None, help="the index folder, if not ROOT/index"),
         arg("--shard-mb", type=float, default=256.0, help="size of each shard in MB (default: 256)"))
def data_pack(args: argparse.Namespace) -> None:
    from data_pipeline.shards import pack_dataset

    splits = pack_dataset(args.root, args.out, index_dir=args.index_dir, shard_mb=args.shard_mb)
    for split, shards in splits.items():
        print(f"{split}: {sum(len(shard.samples) for shard in shards)} images in {len(shards)} shards, "
              f"{sum(shard.num_bytes for shard in shards) / 1e6:,.1f} MB")
    print(f"packed to {args.out}; train from it with data.root={args.out}")


@command("data digits", "render the built-in digits set as an ImageNet-layout JPEG tree",
         arg("--out", required=True, help="folder to create (left as it is if already complete)"))
def data_digits(args: argparse.Namespace) -> None:
    from data_pipeline.digits import MARKER, render_digits

    root = render_digits(args.out)
    counts = json.loads((root / MARKER).read_text())
    print(f"digits: {counts['classes']} classes, {counts['train']} train and {counts['val']} val images in {root}")


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar, from the registered commands."""
    parser = argparse.ArgumentParser(prog="python -m launch", description="Train ResNet image classifiers.",
                                     epilog=f"exit status: {describe_exit_statuses()}")
    commands = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, Any] = {}
    for registered in COMMANDS:
        where = commands
        if len(registered.words) == 2:
            group = registered.words[0]
            if group not in groups:
                groups[group] = commands.add_parser(group, help=GROUPS[group]).add_subparsers(
                    dest=f"{group}_command", required=True)
            where = groups[group]
        sub = where.add_parser(registered.words[-1], help=registered.help)
        for flags, options in registered.arguments:
            sub.add_argument(*flags, **options)
        sub.set_defaults(handler=registered.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m launch` and the `resnet-train` console script; returns the exit status
    (`launch.errors.EXIT_STATUSES`)."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except Exception as error:
        known = exit_status_of(error)
        if known is None:
            raise
        print(f"{known.label}: {error}", file=sys.stderr)
        return known.status
    return 0


def _extras_needed(cfg: RunConfig) -> list[str]:
    """The optional dependencies a run of `cfg` imports somewhere (on the workers too)."""
    needed = {"ray": cfg.launch.launcher == "ray", "mlflow": cfg.tracking.enabled,
              "deepspeed": cfg.distributed.strategy == "deepspeed",
              "nvidia.dali": cfg.data.loader == "dali" and cfg.data.dataset != "synthetic"}
    return [module for module, used in needed.items() if used]


def _resumed_config(cfg: RunConfig, which: str, overrides: Sequence[str]) -> tuple[RunConfig, bool]:
    """The config to continue run `which` with, and whether it continues an existing run folder (False: a new
    run that starts from the checkpoints at URL `which`)."""
    from launch.orchestration.rundir import find_run
    from trainer.checkpoint import open_checkpoints

    run_dir = find_run(cfg.launch.runs_dir, which)
    if run_dir is not None:
        return load_config(run_dir / "config.yaml", overrides), True
    if open_checkpoints(which).latest() is None:
        raise FileNotFoundError(f"--resume {which}: not a run under {cfg.launch.runs_dir}, not a run folder, and no "
                                "committed checkpoint there")
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, url=which)), False


# The other commands live beside this module and register themselves on import (they import `command` from here).
from launch import cli_bench, cli_models  # noqa: E402, F401
