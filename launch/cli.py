"""`python -m launch <command>`: train, eval, export, promote, bench, and data preparation.

Each command is one handler, registered with `@command` beside its arguments. A handler returns nothing;
whatever it raises that `launch.errors.EXIT_STATUSES` knows becomes a one-line message and that exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.errors import ConfigError
from configs.extras import require_extras
from configs.loader import dump_config, load_config
from configs.schema import CompileMode, DataConfig, ModelName, RunConfig
from launch.errors import PromotionRefused, describe_exit_statuses, exit_status_of

DEFAULT_CONFIG = "quickstart"
"""The recipe `train` runs when no --config is given: the embedded defaults a new user starts from."""
SOURCE_HELP = ("a checkpoint URL (a run's checkpoints folder: its newest step; or one step_<n> folder) or a "
               "registry URI (models:/NAME/VERSION, models:/NAME@ALIAS)")
GROUPS = {"bench": "measure throughput", "data": "prepare data sets"}
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
                  "recipe as it is); default: the quickstart's, with and without progressive resizing"),
         JSON_ARGUMENT)
def bench_accuracy(args: argparse.Namespace) -> None:
    from launch.bench.accuracy import QUICKSTART_VARIANTS, as_json, bench_accuracy, table
    from launch.bench.gpu import machine_facts
    from trainer.dist import single_process_context

    if not 0 < args.target <= 1:
        raise ConfigError(f"--target={args.target} must be in (0, 1]")
    variants = dict(QUICKSTART_VARIANTS)
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
    from launch.tracking.onnx_export import ONNX_MODULES

    try:
        batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--batch-sizes={args.batch_sizes!r}: expected integers separated by commas") from None
    if not batch_sizes or min(batch_sizes) < 1 or args.iterations < 1 or args.warmup < 0:
        raise ConfigError(f"--batch-sizes={args.batch_sizes!r} must be >= 1, --iterations={args.iterations} >= 1 "
                          f"and --warmup={args.warmup} >= 0")
    require_extras(list(ONNX_MODULES))
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
         JSON_ARGUMENT)
def bench_data(args: argparse.Namespace) -> None:
    from launch.bench.data import bench_data_command

    print(bench_data_command(root=args.root, num_images=args.images, batch_size=args.batch_size,
                             num_workers=args.num_workers, reader_threads=args.reader_threads,
                             image_size=args.image_size, rounds=args.rounds, as_json=args.json))


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
    import torch

    from launch.bench.gpu import GpuBenchSettings, bench_gpu

    settings = GpuBenchSettings() if torch.cuda.is_available() else GpuBenchSettings.tiny()
    given = {"batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "images": args.images}
    for name, value in given.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value} must be >= 1")
    settings = dataclasses.replace(settings, **{name: value for name, value in given.items() if value is not None})
    if args.model is not None:
        settings = dataclasses.replace(settings, model=args.model)
    if args.compile_modes is not None:
        modes = tuple(mode for mode in args.compile_modes.split(",") if mode)
        known = typing.get_args(CompileMode)
        if unknown := [mode for mode in modes if mode not in known]:
            raise ConfigError(f"--compile-modes: unknown mode {unknown[0]!r} (known: {', '.join(known)})")
        settings = dataclasses.replace(settings, compile_modes=modes)
    result = bench_gpu(Path(args.out), settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(result.as_json() if args.json else f"{result.table()}\n(also in {args.out}/bench_gpu.json and .md)")


TRACKING_URI_ARGUMENT = arg("--tracking-uri", default=None,
                            help="MLflow tracking URI, for models:/ URIs (default: $MLFLOW_TRACKING_URI, else the "
                                 "embedded store sqlite:///runs/mlflow.db)")


@command("eval", "top-1/top-5 of a trained model on a data set's val split",
         arg("source", help=SOURCE_HELP),
         arg("--data", default=None, help="data set root (default: the one the model was trained on)"),
         arg("--batch-size", type=int, default=None, help="images per batch (default: the run's)"),
         TRACKING_URI_ARGUMENT, JSON_ARGUMENT)
def evaluate(args: argparse.Namespace) -> None:
    from launch.tracking.artifacts import evaluate_trained
    from trainer.dist import single_process_context

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be >= 1")
    trained = _load_trained(args.source, args.tracking_uri)
    scores = evaluate_trained(trained, device=single_process_context().device, data_root=args.data,
                              overrides={"batch_size": args.batch_size} if args.batch_size else None)
    if args.json:
        print(json.dumps({"source": trained.source, **scores}))
    else:
        print(f"{trained.source}\nval top-1  {100 * scores['val_top1']:.2f}% of {int(scores['val_images'])} "
              f"images\nval top-5  {100 * scores['val_top5']:.2f}%\nval loss   {scores['val_loss']:.4f}")


@command("export", "write a trained model as a torchvision state dict and a torch.export or ONNX program",
         arg("source", help=SOURCE_HELP),
         arg("--out", required=True, help="folder to write model.pt, the program and model.json into"),
         arg("--format", choices=["pt2", "onnx"], default="pt2",
             help="the program: pt2 (default): model.pt2, a torch.export program; onnx: model.onnx (opset 18), "
                  "kept only if onnxruntime matches PyTorch on real val images (needs the extra 'onnx')"),
         arg("--check-images", type=int, default=256,
             help="onnx: val images of the model's data set to check the export on (default: 256)"),
         arg("--data", default=None, help="onnx: the data set to take those images from (default: the model's)"),
         TRACKING_URI_ARGUMENT)
def export(args: argparse.Namespace) -> None:
    from launch.tracking.artifacts import evaluation_images, export_trained
    from launch.tracking.onnx_export import ONNX_MODULES

    if args.check_images < 1:
        raise ConfigError(f"--check-images={args.check_images} must be >= 1")
    if args.format == "onnx":
        require_extras(list(ONNX_MODULES))
    trained = _load_trained(args.source, args.tracking_uri)
    images = (evaluation_images(trained, args.check_images, data_root=args.data) if args.format == "onnx"
              else None)
    written = export_trained(trained, Path(args.out), format=args.format, parity_images=images)
    size = trained.cfg.data.crop_size(train=False)
    kind = "torch.export" if args.format == "pt2" else "ONNX"
    print(f"{trained.source}:\n  state dict  {written['state_dict']}\n  {kind}  {written['program']} "
          f"(float32 [N, 3, {size}, {size}], normalised with the ImageNet mean/std, -> logits)\n"
          f"  metadata  {written['metadata']} (architecture, how to load it into torchvision, input, classes)")
    if "parity" in written:
        print(f"  checked: {written['parity'].describe()}")


@command("predict", "classify image files with a checkpoint or a registered model, as its served model would",
         arg("source", help=SOURCE_HELP),
         arg("images", nargs="+", help="image files, or folders to take every .jpg/.jpeg/.png under"),
         arg("--top-k", type=int, default=5, help="classes to list per image (default: 5)"),
         TRACKING_URI_ARGUMENT, JSON_ARGUMENT)
def predict(args: argparse.Namespace) -> None:
    from launch.tracking.artifacts import image_files, predict_files

    if args.top_k < 1:
        raise ConfigError(f"--top-k={args.top_k} must be >= 1")
    files = image_files(args.images)
    trained = _load_trained(args.source, args.tracking_uri)
    answers = predict_files(trained, files, top_k=args.top_k)
    for row in answers.to_dict(orient="records"):
        if args.json:
            print(json.dumps(row))
        else:
            top = ", ".join(f"{name} {100 * p:.1f}%" for name, p in zip(row["top_k_names"],
                                                                        row["top_k_probabilities"], strict=True))
            print(f"{row['file']}: {row['class_name']} ({100 * row['probability']:.1f}%)   top-{args.top_k}: {top}")


@command("promote", "move a registered model's alias to a version, if its metric passes the gate",
         arg("name", help="registered model name, e.g. resnet50-imagenet"),
         arg("--version", required=True, help="the model version to promote"),
         arg("--alias", required=True, help="the alias to move, e.g. production or staging"),
         arg("--metric", default="val_top1", help="version tag the gate compares (default: val_top1)"),
         arg("--min", type=float, default=None, dest="minimum", help="the floor the metric must reach (default: none)"),
         arg("--force", action="store_true",
             help="move the alias even if the gate refuses (the reason records what was overridden)"),
         arg("--dry-run", action="store_true", help="print the decision without moving anything"),
         arg("--eval-data", default=None, metavar="ROOT|URL",
             help="score the candidate and the alias's holder here, on this indexed data set's val split, and "
                  "compare those scores (default: trust the versions' own tags)"),
         arg("--max-regression", type=float, default=0.0,
             help="how far below the holder's metric the candidate may be (default: 0)"),
         TRACKING_URI_ARGUMENT)
def promote(args: argparse.Namespace) -> None:
    from launch.tracking.registry import promote
    from launch.tracking.store import command_tracking_uri, limit_http_calls
    from trainer.dist import single_process_context

    uri = command_tracking_uri(args.tracking_uri)
    limit_http_calls(timeout_s=10, max_retries=1)  # a dead server: an error in seconds
    if args.max_regression < 0:
        raise ConfigError(f"--max-regression={args.max_regression} must be >= 0")
    decision = promote(uri, args.name, args.version, args.alias, metric=args.metric, minimum=args.minimum,
                       force=args.force, dry_run=args.dry_run, max_regression=args.max_regression,
                       eval_data=args.eval_data,
                       device=single_process_context().device if args.eval_data is not None else None)
    print(decision.describe(dry_run=args.dry_run))
    if not decision.accepted:
        raise PromotionRefused(decision.reason)


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


def _load_trained(source: str, tracking_uri: str | None) -> Any:
    """The trained model of an eval/export SOURCE; a registry URI reads the store `--tracking-uri` names."""
    from launch.tracking.artifacts import load_trained
    from launch.tracking.store import command_tracking_uri

    uri = command_tracking_uri(tracking_uri) if source.startswith("models:/") else tracking_uri
    return load_trained(source, tracking_uri=uri)


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
