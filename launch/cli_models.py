"""The commands on trained models: `eval`, `export`, `predict`, `serve` and `promote`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from configs.errors import ConfigError
from configs.extras import modules_of, require_extras
from launch.cli import JSON_ARGUMENT, arg, command
from launch.errors import PromotionRefused

SOURCE_HELP = ("a checkpoint URL (a run's checkpoints folder: its newest step; or one step_<n> folder) or a "
               "registry URI (models:/NAME/VERSION, models:/NAME@ALIAS)")
TRACKING_URI_ARGUMENT = arg("--tracking-uri", default=None,
                            help="MLflow tracking URI, for models:/ URIs (default: $MLFLOW_TRACKING_URI, else the "
                                 "embedded store sqlite:///runs/mlflow.db)")


CLASS_MAP_ARGUMENT = arg("--class-map", default=None, metavar="FILE",
                         help="names for an evaluation set's folders: a JSON object or lines 'folder class-name' "
                              "(needed where folders are numbered, as ImageNetV2's); folders it does not list keep "
                              "their own names. Classes are always matched to the model's by name")


@command("eval", "top-1/top-5 of a trained model on the val split of one or more data sets, classes matched by name",
         arg("source", help=SOURCE_HELP),
         arg("--data", action="append", default=None, metavar="ROOT|URL",
             help="a data set to score (repeatable: each is reported, and the gap to the first; default: the one "
                  "the model was trained on)"),
         CLASS_MAP_ARGUMENT,
         arg("--batch-size", type=int, default=None, help="images per batch (default: the run's)"),
         TRACKING_URI_ARGUMENT, JSON_ARGUMENT)
def evaluate(args: argparse.Namespace) -> None:
    from launch.tracking.artifacts import evaluate_trained
    from launch.tracking.class_match import read_class_map
    from trainer.dist import single_process_context

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be >= 1")
    class_map = read_class_map(args.class_map) if args.class_map else None
    trained = _load_trained(args.source, args.tracking_uri)
    results = []
    for root in args.data or [None]:
        scored = evaluate_trained(trained, device=single_process_context().device, data_root=root,
                                  overrides={"batch_size": args.batch_size} if args.batch_size else None,
                                  class_map=class_map)
        results.append({"data": root or trained.cfg.data.root, **scored.scores, "classes": scored.classes.how,
                        "class_map_digest": scored.classes.digest})
    if args.json:
        for result in results:
            print(json.dumps({"source": trained.source, **result}))
        return
    print(trained.source)
    for result in results:
        gap = ("" if result is results[0] else
               f" ({100 * (result['val_top1'] - results[0]['val_top1']):+.2f} points from the first)")
        print(f"{result['data']}: val top-1 {100 * result['val_top1']:.2f}%{gap}, top-5 "
              f"{100 * result['val_top5']:.2f}%, loss {result['val_loss']:.4f}, {int(result['val_images'])} images; "
              f"classes {result['classes']} (mapping {result['class_map_digest']})")


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

    if args.check_images < 1:
        raise ConfigError(f"--check-images={args.check_images} must be >= 1")
    if args.format == "onnx":
        require_extras(modules_of("onnx"))
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


@command("serve", "serve a registered model over HTTP with MLflow's scoring server (no activated environment "
         "needed); Ctrl-C stops it",
         arg("model_uri", help="models:/NAME@ALIAS or models:/NAME/VERSION"),
         arg("--port", type=int, default=5001, help="port to listen on (default: 5001)"),
         arg("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"),
         TRACKING_URI_ARGUMENT)
def serve(args: argparse.Namespace) -> None:
    from launch.tracking.serve import serve
    from launch.tracking.store import command_tracking_uri

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port={args.port} must be in 1..65535")
    status = serve(args.model_uri, tracking_uri=command_tracking_uri(args.tracking_uri), host=args.host,
                   port=args.port)
    if status != 0:
        raise SystemExit(status)


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
         CLASS_MAP_ARGUMENT,
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
    from launch.tracking.class_match import read_class_map

    if args.class_map is not None and args.eval_data is None:
        raise ConfigError("--class-map names the folders of --eval-data: give both")
    decision = promote(uri, args.name, args.version, args.alias, metric=args.metric, minimum=args.minimum,
                       force=args.force, dry_run=args.dry_run, max_regression=args.max_regression,
                       eval_data=args.eval_data, class_map=read_class_map(args.class_map) if args.class_map else None,
                       device=single_process_context().device if args.eval_data is not None else None)
    print(decision.describe(dry_run=args.dry_run))
    if not decision.accepted:
        raise PromotionRefused(decision.reason)


def _load_trained(source: str, tracking_uri: str | None) -> Any:
    """The trained model of an eval/export SOURCE; a registry URI reads the store `--tracking-uri` names."""
    from launch.tracking.artifacts import load_trained
    from launch.tracking.store import command_tracking_uri

    uri = command_tracking_uri(tracking_uri) if source.startswith("models:/") else tracking_uri
    return load_trained(source, tracking_uri=uri)
