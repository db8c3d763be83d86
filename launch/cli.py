"""`python -m launch <command>`: train, eval, export, promote, bench, and data preparation."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from configs.extras import MissingExtraError, require_extras
from configs.loader import ConfigError, dump_config, load_config
from configs.schema import RunConfig

DEFAULT_CONFIG = "quickstart"
"""The recipe `train` runs when no --config is given: the embedded defaults a new user starts from."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    parser = argparse.ArgumentParser(prog="python -m launch", description="Train ResNet image classifiers.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a config and overrides")
    train.add_argument("--config", default=DEFAULT_CONFIG,
                       help=f"YAML recipe: a path, or the name of one in configs/ (default: {DEFAULT_CONFIG})")
    train.add_argument("--launcher", choices=["ray", "torchrun"], default=None,
                       help="ray (default): Ray Train workers, restarted after failures; torchrun: this process, or "
                            "each process torchrun starts (sets launch.launcher)")
    train.add_argument("--resume", metavar="RUN", default=None,
                       help="continue a run from its latest checkpoint: its name under launch.runs_dir, 'latest', "
                            "or its folder (its saved config is used; overrides apply on top); or a checkpoint "
                            "URL to start a new run from")
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

    data_bench = bench_commands.add_parser(
        "data", help="images/s of the DALI pipeline against the baseline DataLoader on the same JPEG files")
    data_bench.add_argument("--root", default=None,
                            help="an indexed ImageNet-layout tree to read (default: generate --images JPEGs)")
    data_bench.add_argument("--images", type=int, default=1024,
                            help="generated training images, 500x375 px at quality 90 (default: 1024)")
    data_bench.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    data_bench.add_argument("--num-workers", type=int, default=2,
                            help="DataLoader processes and DALI threads, the same for both (default: 2)")
    data_bench.add_argument("--image-size", type=int, default=224, help="crop side in pixels (default: 224)")
    data_bench.add_argument("--rounds", type=int, default=3, help="timed epochs per loader (default: 3)")
    data_bench.add_argument("--json", action="store_true", help="print one JSON line instead of the table")

    train_bench = bench_commands.add_parser(
        "train", help="end-to-end images/s of a whole training run (per device, all devices, MFU on GPUs)")
    train_bench.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML recipe (default: {DEFAULT_CONFIG})")
    train_bench.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    train_bench.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")

    launch_bench = bench_commands.add_parser(
        "launch", help="time to first step under torchrun and Ray, and Ray's restart latency after a worker dies")
    launch_bench.add_argument("--workers", type=int, default=2, help="training processes (default: 2)")
    launch_bench.add_argument("--json", action="store_true", help="print one JSON line instead of the table")

    source_help = ("a checkpoint URL (a run's checkpoints folder: its newest step; or one step_<n> folder) or a "
                   "registry URI (models:/NAME/VERSION, models:/NAME@ALIAS)")
    evaluate = commands.add_parser("eval", help="top-1/top-5 of a trained model on a data set's val split")
    evaluate.add_argument("source", help=source_help)
    evaluate.add_argument("--data", default=None, help="data set root (default: the one the model was trained on)")
    evaluate.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the run's)")
    evaluate.add_argument("--tracking-uri", default=None, help="for models:/ URIs (default: $MLFLOW_TRACKING_URI, "
                          "else sqlite:///runs/mlflow.db)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    export = commands.add_parser(
        "export", help="write a trained model as a torchvision state dict and a torch.export program")
    export.add_argument("source", help=source_help)
    export.add_argument("--out", required=True, help="folder to write model.pt and model.pt2 into")
    export.add_argument("--tracking-uri", default=None, help="for models:/ URIs (as for eval)")

    promote = commands.add_parser(
        "promote", help="move a registered model's alias to a version, if its metric passes the gate")
    promote.add_argument("name", help="registered model name, e.g. resnet50-imagenet")
    promote.add_argument("--version", required=True, help="the model version to promote")
    promote.add_argument("--alias", required=True, help="the alias to move, e.g. production or staging")
    promote.add_argument("--metric", default="val_top1", help="version tag the gate compares (default: val_top1)")
    promote.add_argument("--min", type=float, default=None, dest="minimum",
                         help="the floor the metric must reach (default: none)")
    promote.add_argument("--force", action="store_true",
                         help="move the alias even if the gate refuses (the reason records what was overridden)")
    promote.add_argument("--dry-run", action="store_true", help="print the decision without moving anything")
    promote.add_argument("--tracking-uri", default=None,
                         help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the embedded store "
                              "sqlite:///runs/mlflow.db)")

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
    4 failed more often than launch.max_failures allows (Ray), 5 promotion refused by the gate, 75 preempted
    by SIGTERM after a checkpoint (requeue to resume).
    """
    from data_pipeline import DatasetError
    from launch.errors import RunFailed
    from trainer.loop import TrainingDiverged
    from trainer.preempt import EXIT_PREEMPTED, Preempted

    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            overrides = [*args.overrides, *([f"launch.launcher={args.launcher}"] if args.launcher else [])]
            cfg = load_config(args.config, overrides)
            resume = False
            if args.resume is not None:
                cfg, resume = _resumed_config(cfg, args.resume, overrides)
            if args.print_config:
                print(dump_config(cfg), end="")
                return 0
            require_extras(_extras_needed(cfg))
            if cfg.launch.launcher == "ray":
                from launch.ray_launcher import run_ray

                if "TORCHELASTIC_RUN_ID" in os.environ:
                    raise ConfigError("started by torchrun with launch.launcher='ray': add --launcher torchrun")

                run_ray(cfg, resume=resume)
            else:
                from launch.local import run_local

                run_local(cfg, resume=resume)
        elif args.command == "bench" and args.bench_command == "step":
            from launch.bench import bench_step

            if args.steps < 1 or args.rounds < 1:
                raise ConfigError(f"--steps={args.steps} and --rounds={args.rounds} must both be >= 1")
            result = bench_step(load_config(args.config, args.overrides), steps=args.steps, rounds=args.rounds)
            print(result.as_json() if args.json else result.table())
        elif args.command == "bench" and args.bench_command == "train":
            from launch.bench import bench_train

            measured = bench_train(load_config(args.config, args.overrides), config_name=args.config)
            (Path(measured.run_dir) / "bench.json").write_text(measured.as_json() + "\n")
            print(measured.as_json() if args.json else f"{measured.table()}\n(also in {measured.run_dir}/bench.json)")
        elif args.command == "bench" and args.bench_command == "launch":
            import tempfile

            from data_pipeline.digits import render_digits
            from launch.bench import bench_launch

            with tempfile.TemporaryDirectory(prefix="bench-launch-") as scratch:
                digits = render_digits(Path(scratch) / "digits")
                launched = bench_launch(data_root=str(digits), scratch=Path(scratch) / "runs", workers=args.workers)
            print(launched.as_json() if args.json else launched.table())
        elif args.command == "bench":
            from launch.data import bench_data_command

            print(bench_data_command(root=args.root, num_images=args.images, batch_size=args.batch_size,
                                     num_workers=args.num_workers, image_size=args.image_size, rounds=args.rounds,
                                     as_json=args.json))
        elif args.command in ("eval", "export"):
            from launch.artifacts import evaluate_trained, export_trained, load_trained

            uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if args.source.startswith("models:/") and uri is None:
                uri = _embedded_store()
            trained = load_trained(args.source, tracking_uri=uri)
            if args.command == "export":
                written = export_trained(trained, Path(args.out))
                print(f"{trained.source}:\n  state dict  {written['state_dict']}\n  torch.export  {written['program']} "
                      f"(float32 [N, 3, {trained.cfg.data.image_size}, {trained.cfg.data.image_size}], normalised "
                      "with the ImageNet mean/std, -> logits)")
                return 0
            if args.batch_size is not None and args.batch_size < 1:
                raise ConfigError(f"--batch-size={args.batch_size} must be >= 1")
            scores = evaluate_trained(trained, data_root=args.data,
                                      overrides={"batch_size": args.batch_size} if args.batch_size else None)
            if args.json:
                print(json.dumps({"source": trained.source, **scores}))
            else:
                print(f"{trained.source}\nval top-1  {100 * scores['val_top1']:.2f}% of {int(scores['val_images'])} "
                      f"images\nval top-5  {100 * scores['val_top5']:.2f}%\nval loss   {scores['val_loss']:.4f}")
        elif args.command == "promote":
            from launch.registry import EXIT_REFUSED, promote

            uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _embedded_store()
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")  # a dead server: an error in seconds
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            decision = promote(uri, args.name, args.version, args.alias, metric=args.metric, minimum=args.minimum,
                               force=args.force, dry_run=args.dry_run)
            print(decision.describe(dry_run=args.dry_run))
            if not decision.accepted:
                return EXIT_REFUSED
        elif args.command == "data":
            from launch.data import prepare_command, render_digits_command

            if args.data_command == "prepare":
                prepare_command(args.root, out=args.out, num_workers=args.num_workers)
            else:
                render_digits_command(args.out)
    except (ConfigError, DatasetError, FileNotFoundError, FileExistsError, MissingExtraError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 3
    except RunFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 4
    except Preempted as error:
        print(f"preempted: {error}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


def _extras_needed(cfg: RunConfig) -> list[str]:
    """The optional dependencies a run of `cfg` imports somewhere (on the workers too)."""
    needed = {"ray": cfg.launch.launcher == "ray", "mlflow": cfg.tracking.enabled,
              "deepspeed": cfg.distributed.strategy == "deepspeed",
              "nvidia.dali": cfg.data.loader == "dali" and cfg.data.dataset != "synthetic"}
    return [module for module, used in needed.items() if used]


def _embedded_store() -> str:
    """The embedded tracking store of the default runs folder (tracking.uri unset, launch.runs_dir=runs)."""
    database = Path(RunConfig().launch.runs_dir).resolve() / "mlflow.db"
    if not database.is_file():
        raise FileNotFoundError(f"no tracking store at {database}: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return f"sqlite:///{database}"


def _resumed_config(cfg: RunConfig, which: str, overrides: Sequence[str]) -> tuple[RunConfig, bool]:
    """The config to continue run `which` with, and whether it continues an existing run folder (False: a new
    run that starts from the checkpoints at URL `which`)."""
    from launch.rundir import find_run

    run_dir = find_run(cfg.launch.runs_dir, which)
    if run_dir is not None:
        return load_config(run_dir / "config.yaml", overrides), True
    from data_pipeline.fs import open_storage
    from trainer.checkpoint import CheckpointManager

    if CheckpointManager(open_storage(which), keep_last=1).latest() is None:
        raise FileNotFoundError(f"--resume {which}: not a run under {cfg.launch.runs_dir}, not a run folder, and no "
                                "committed checkpoint there")
    return _with_checkpoint_url(cfg, which), False


def _with_checkpoint_url(cfg: RunConfig, url: str) -> RunConfig:
    import dataclasses

    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, url=url))
