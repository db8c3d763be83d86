"""`eval` and `export`: a trained model, from a checkpoint or the registry, evaluated on a data set or written
out for serving.

A source is either a checkpoint URL (a run's checkpoints folder, whose newest committed step is used, or one
`step_<n>` folder in it, as summary.json's `checkpoint_url` names it) or a registry URI
(`models:/NAME/VERSION` or `models:/NAME@ALIAS`), whose run holds the raw state dict and the config.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from configs.errors import ConfigError
from configs.extras import import_extra
from configs.loader import config_from_dict, load_config
from configs.schema import DataConfig, RunConfig
from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from data_pipeline.prepare import CLASSES_FILE
from launch.tracking.class_match import ClassMatch, RemappedLoader, match_classes
from launch.tracking.onnx_export import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, ParityError, check_parity, export_onnx
from trainer.checkpoint import STEP_FOLDER, open_checkpoints
from trainer.engine import prepare_model
from trainer.models import build_model
from trainer.serialize import from_bytes


@dataclass(frozen=True, slots=True)
class Trained:
    """A trained network (CPU, eval mode), the config that trained it, and where it came from."""

    network: nn.Module
    cfg: RunConfig
    source: str
    meta: dict[str, Any]
    """What its source says of it: a checkpoint's manifest meta (step, epoch, val_*), or a version's tags."""


def load_trained(source: str, *, tracking_uri: str | None = None, weights: str = "final") -> Trained:
    """The network and config of a checkpoint URL or a registry URI (see the module docstring). From a
    run's checkpoints folder, `weights` chooses (tracking.register_weights): final: the newest committed
    step; best: the committed step with the highest val top-1; ema: the newest step's weight average, whose
    scores (meta ema_val_*) then stand as its val_*. meta["weights"] says which."""
    if source.startswith("models:/"):
        return _from_registry(source, tracking_uri)
    parent, _, last = source.rstrip("/").rpartition("/")
    match = STEP_FOLDER.match(last) if parent else None
    manager = open_checkpoints(parent if match else source)
    if match:
        step = int(match["step"])
        manifest = manager.manifest(step)
        if manifest is None:
            raise FileNotFoundError(f"{source}: no committed checkpoint of step {step} there")
    else:
        manifest = manager.best() if weights == "best" else manager.latest()
        if manifest is None:
            raise FileNotFoundError(f"{source}: no committed checkpoint there (a run's checkpoints folder, "
                                    "a step_<n> folder in it, or models:/NAME@ALIAS)"
                                    + (" with a val top-1" if weights == "best" else ""))
    cfg = config_from_dict(manifest.meta["config"], f"{manager.url(manifest.step)}/manifest.json")
    meta = {**manifest.meta, "weights": weights}
    file = "model.pt"
    if weights == "ema":
        if "ema.pt" not in manifest.files:
            raise ConfigError(f"{manager.url(manifest.step)}: no EMA weights in this checkpoint (they are kept "
                              "when optim.ema_decay > 0)")
        file = "ema.pt"
        meta.update({key.removeprefix("ema_"): value for key, value in manifest.meta.items()
                     if key.startswith("ema_val_")})
    network = build_model(cfg.model)
    network.load_state_dict(from_bytes(manager.read_verified(manifest, file)))
    return Trained(network.eval(), cfg, f"{manager.url(manifest.step)}" + ("" if file == "model.pt" else f"/{file}"),
                   meta)


def _from_registry(uri: str, tracking_uri: str | None) -> Trained:
    mlflow = import_extra("mlflow")
    mlflow_exceptions = import_extra("mlflow.exceptions")
    client = mlflow.MlflowClient(tracking_uri)
    match = re.match(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$", uri)
    if match is None:
        raise ConfigError(f"{uri}: a registry URI looks like models:/NAME/VERSION or models:/NAME@ALIAS")
    try:
        if match["version"]:
            version = client.get_model_version(match["name"], match["version"])
        else:
            version = client.get_model_version_by_alias(match["name"], match["alias"])
    except mlflow_exceptions.MlflowException as error:  # unknown name, version or alias; an unreachable server
        raise ConfigError(f"{uri} at {client.tracking_uri}: {error.message}") from error
    if "weights" not in version.tags:
        raise ConfigError(f"{uri}: version {version.version} was not registered by this trainer (no weights tag)")
    with tempfile.TemporaryDirectory(prefix="registry-") as scratch:
        folder = Path(client.download_artifacts(version.run_id, version.tags["weights"], scratch))
        cfg = load_config(folder / "config.yaml")
        state = folder / "model.pt"
        network = build_model(cfg.model)
        network.load_state_dict(torch.load(state, map_location="cpu", weights_only=True))
        meta: dict[str, Any] = dict(version.tags)
        if (classes := folder / CLASSES_FILE).exists():  # registered since the class names are recorded
            meta["classes"] = classes.read_text().splitlines()
    return Trained(network.eval(), cfg, f"{uri} (version {version.version} of run {version.run_id})", meta)


@dataclass(frozen=True, slots=True)
class Scored:
    """An evaluation: the scores, and how the data set's classes were matched to the model's outputs."""

    scores: dict[str, float]
    """val_top1, val_top5, val_loss, val_images."""
    classes: ClassMatch


def evaluate_trained(trained: Trained, *, device: torch.device, data_root: str | None = None,
                     overrides: dict[str, Any] | None = None, class_map: dict[str, str] | None = None) -> Scored:
    """Top-1/top-5 and loss of `trained` over the val split of its data set (or of the one at `data_root`),
    in one process on `device` (the caller's context's: a Ray worker's own GPU, or a command's). The data
    set's classes are matched to the model's by name (`class_map` renames folders first; see
    `class_match`)."""
    from data_pipeline import build_loaders
    from trainer.evaluate import evaluate
    from trainer.precision import resolve_precision

    data = _data_config(trained, data_root, overrides)
    precision = resolve_precision(trained.cfg.precision, device)
    loaders = build_loaders(data, seed=trained.cfg.seed, device=device, dtype=precision.input_dtype)
    match = match_classes(loaders.classes, trained.meta.get("classes"), outputs=trained.cfg.model.num_classes,
                          data=data.root, class_map=class_map)
    channels_last = trained.cfg.precision.channels_last
    network = prepare_model(trained.network, device, channels_last=channels_last)
    val = loaders.val if match.identity else RemappedLoader(loaders.val, match)
    return Scored(evaluate(network, val, precision, channels_last=channels_last, flip_average=data.val_flip_average),
                  match)


def _data_config(trained: Trained, data_root: str | None, overrides: dict[str, Any] | None) -> DataConfig:
    """`trained`'s data settings, reading the data set at `data_root` if given, with `overrides`."""
    data = trained.cfg.data
    if data_root is not None:
        data = replace(data, root=data_root, index_dir=None)
    return replace(data, **(overrides or {}))


def evaluation_images(trained: Trained, count: int, *, data_root: str | None = None) -> torch.Tensor:
    """The first `count` val images of `trained`'s data set (or of the one at `data_root`), preprocessed as its
    evaluation does: float32 [count, 3, S, S] on the CPU (fewer if the split is smaller)."""
    from data_pipeline import build_loaders

    data = _data_config(trained, data_root, {"batch_size": min(count, trained.cfg.data.batch_size)})
    loaders = build_loaders(data, seed=trained.cfg.seed, device=torch.device("cpu"), dtype=torch.float32)
    batches, taken = [], 0
    for images, _ in loaders.val.iter_epoch(0):
        batches.append(images.float().contiguous())
        taken += len(images)
        if taken >= count:
            break
    return torch.cat(batches)[:count]


EXPORT_FORMATS = {"pt2": "model.pt2", "onnx": "model.onnx"}
"""`export --format`: the program file each format writes beside model.pt and model.json."""


def export_metadata(trained: Trained, *, format: str = "pt2") -> dict[str, Any]:
    """What a consumer of the exported files needs to know: the architecture (and whether torchvision's own
    constructor builds it), the input the program takes and how to make it from an image, the outputs and
    the class names, and where the weights came from."""
    model = trained.cfg.model
    size = trained.cfg.data.crop_size(train=False)
    stem = []
    if model.small_input:
        stem.append("m.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False); "
                    "m.maxpool = torch.nn.Identity()")
    return {
        "architecture": model.name, "num_classes": model.num_classes, "small_input": model.small_input,
        "blurpool": model.blurpool,
        # Loading into torchvision: its constructor builds the default stem, so a small-input network needs
        # its stem replaced first; a BlurPool network has extra layers torchvision does not build at all.
        "load_into_torchvision": None if model.blurpool else "; ".join([
            f"m = torchvision.models.{model.name}(num_classes={model.num_classes})", *stem,
            "m.load_state_dict(torch.load('model.pt', weights_only=True))"]),
        "input": {"program": f"float32 [N, 3, {size}, {size}] (NCHW), N dynamic", "size": size,
                  "crop_ratio": trained.cfg.data.val_crop_ratio,
                  "preprocessing": f"RGB; the centred square of crop_ratio x the shorter side, resized to {size} x "
                                   f"{size} px (bilinear); divide by 255; subtract mean, divide by std",
                  "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "output": f"logits [N, {model.num_classes}]; class i is classes[i]",
        "program": {"file": EXPORT_FORMATS[format], "format": "torch.export" if format == "pt2" else "onnx",
                    **({"opset": ONNX_OPSET, "input_name": INPUT_NAME, "output_name": OUTPUT_NAME}
                       if format == "onnx" else {})},
        "classes": trained.meta.get("classes"),
        "source": trained.source, "step": trained.meta.get("step"), "val_top1": trained.meta.get("val_top1"),
    }


def export_program(network: nn.Module, size: int, path: Path) -> None:
    """Write `network` (float32, on the CPU) as a torch.export program for [N, 3, size, size] inputs, N dynamic."""
    example = torch.randn(2, 3, size, size)
    program = torch.export.export(network.eval(), (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, path)


def export_trained(trained: Trained, out: Path, *, format: str = "pt2",
                   parity_images: torch.Tensor | None = None) -> dict[str, Any]:
    """Write `out/model.pt` (the torchvision-compatible state dict), the program (`format` pt2: `model.pt2`, a
    torch.export program; onnx: `model.onnx`; either takes float32 images [N, 3, S, S], normalised as in
    training, to logits [N, classes], N dynamic) and `out/model.json` (`export_metadata`). An ONNX file is
    checked against the network on `parity_images` (required for onnx; see onnx_export.py) and removed if it
    disagrees (ParityError); the check's result is returned under "parity"."""
    out.mkdir(parents=True, exist_ok=True)
    network = prepare_model(trained.network, torch.device("cpu"), channels_last=False).eval()
    state = out / "model.pt"
    torch.save(network.state_dict(), state)
    size = trained.cfg.data.crop_size(train=False)
    exported = out / EXPORT_FORMATS[format]
    written: dict[str, Any] = {"state_dict": state, "program": exported}
    if format == "onnx":
        if parity_images is None:
            raise ValueError("an ONNX export needs images to check it on")
        export_onnx(network, size, exported)
        written["parity"] = parity = check_parity(exported, network, parity_images)
        if not parity.ok:
            exported.unlink()
            raise ParityError(f"{exported}: {parity.describe()}: outside the tolerance, not kept")
    else:
        export_program(network, size, exported)
    metadata = out / "model.json"
    metadata.write_text(json.dumps(export_metadata(trained, format=format), indent=2) + "\n")
    return {**written, "metadata": metadata}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""Files `predict` takes from a folder (any case)."""


def image_files(paths: list[str]) -> list[Path]:
    """The files named, and the image files under the folders named (sorted); a missing path is an error."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{given}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(paths)}")
    return files


def predict_files(trained: Trained, files: list[Path], *, top_k: int) -> Any:
    """Classify image files with `trained` exactly as its served model would (the same code, over the same
    exported program and metadata): a DataFrame of class_id, class_name, probability and the top-k."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException

    from launch.tracking.served_model import ImageClassifierModel

    with tempfile.TemporaryDirectory(prefix="predict-") as scratch:
        written = export_trained(trained, Path(scratch))
        model = ImageClassifierModel()
        model.load_context(SimpleNamespace(artifacts={"program": str(written["program"]),
                                                      "metadata": str(written["metadata"])}))
    answers = []
    for file in files:
        try:
            answers.append(model.predict(None, [file.read_bytes()], params={"top_k": top_k}))
        except MlflowException as error:  # the served model's refusal (an undecodable file): named, with its reason
            raise ConfigError(f"{file}: {error.message}") from error
    import pandas as pd

    return pd.concat(answers, ignore_index=True).assign(file=[str(file) for file in files])


STATE_DICT_SUFFIXES = (".pt", ".pth")
"""model.init_from sources read as one state dict file (torchvision's weights files are of this kind)."""


def load_initial_state(source: str, *, tracking_uri: str | None = None) -> dict[str, torch.Tensor]:
    """The weights `model.init_from` names: a state dict file or URL (.pt/.pth), a run's checkpoints folder or
    step folder (its model.pt), or a registered model (models:/...)."""
    from data_pipeline.storage import open_storage

    if source.startswith("models:/") or not source.endswith(STATE_DICT_SUFFIXES):
        return load_trained(source, tracking_uri=tracking_uri).network.state_dict()
    parent, _, name = source.rpartition("/")
    try:
        data = open_storage(parent or ".").read_bytes(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"model.init_from={source}: no such file") from None
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.init_from={source}: not a state dict (a mapping of parameter names to tensors)")
    return state


__all__ = ["Trained", "evaluate_trained", "export_trained", "image_files", "load_initial_state", "load_trained",
           "predict_files"]
