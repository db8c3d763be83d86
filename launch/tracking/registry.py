"""The MLflow model registry: registering a run's model, and moving an alias through a metric gate.

A registered version holds two things:
- `model/`: an MLflow pyfunc "model from code" (`served_model.py`, no pickle) over the torch.export program
  and model.json that `export` writes. It takes what clients have, uint8 RGB images of any size or encoded
  JPEG/PNG files, crops and normalises them as the run's evaluation did, and returns class ids, class names
  and probabilities with the top-k. `mlflow.pyfunc.load_model("models:/NAME@production").predict(images)`
  or `mlflow models serve -m models:/NAME@production` is all a consumer needs.
- the run artifacts `weights/step_<n>/model.pt`, the raw state dict, loadable into torchvision's ResNet of
  the same depth (and `trainer.models.build_model` with the same model config) for fine-tuning or logits,
  and `weights/step_<n>/config.yaml`, the config that trained it (a resumed run may have changed it).
Its tags say where it comes from: val_top1, val_top5 (of the registered weights), epochs, step, dataset,
config_hash, run_id, `registered_weights` (final, best or ema: tracking.register_weights) and `weights` (the
artifact folder above).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from configs.extras import import_extra
from configs.errors import ConfigError
from configs.loader import dump_config
from configs.schema import RESERVED_ALIAS, RunConfig
from data_pipeline.prepare import CLASSES_FILE
from launch.tracking.artifacts import evaluate_trained, export_trained, load_trained
from launch.tracking.sink import config_hash
from trainer.checkpoint import step_folder

def served_signature() -> Any:
    """The served model's outputs and its `top_k` parameter. No input schema: MLflow would cast what clients
    send to it (float pixels to uint8, silently), and the model takes arrays of any size and encoded files,
    checking them itself (launch/tracking/served_model.py)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    outputs = Schema([ColSpec("long", "class_id"), ColSpec("string", "class_name"), ColSpec("double", "probability"),
                      ColSpec(Array("long"), "top_k_ids"), ColSpec(Array("string"), "top_k_names"),
                      ColSpec(Array("double"), "top_k_probabilities")])
    return ModelSignature(inputs=None, outputs=outputs, params=ParamSchema([ParamSpec("top_k", "long", 5)]))


def dataset_name(cfg: RunConfig) -> str:
    """`digits`/`synthetic`, or for a folder data set the last part of its root (`imagenet` for s3://b/imagenet)."""
    if cfg.data.dataset != "folder":
        return cfg.data.dataset
    return cfg.data.root.rstrip("/").rsplit("/", 1)[-1] or cfg.data.root


def model_name(cfg: RunConfig) -> str:
    """The registered model a run's versions go to: tracking.model_name, or <model>-<data set name>."""
    return cfg.tracking.model_name or f"{cfg.model.name}-{dataset_name(cfg)}"


def register_model(cfg: RunConfig, *, tracking_uri: str, run_id: str, checkpoint_url: str,
                   device: torch.device | None = None) -> str:
    """Log the model of run `run_id` that tracking.register_weights chooses (final, best, EMA or averaged
    weights; an average is computed on `device`, default the CPU) and register it as a new version of
    `model_name(cfg)`; return its URI (models:/NAME/VERSION). Weights already registered for this run (by an
    attempt Ray restarted after it had registered) are not registered twice."""
    mlflow = import_extra("mlflow")
    weights = cfg.tracking.register_weights
    if weights == "average":
        from launch.tracking.averaging import averaged_trained

        trained = averaged_trained(checkpoint_url, last=cfg.tracking.average_last,
                                   bn_batches=cfg.tracking.average_bn_batches, device=device or torch.device("cpu"))
    else:
        trained = load_trained(checkpoint_url, weights=weights)
    meta = trained.meta
    name = model_name(cfg)
    client = mlflow.MlflowClient(tracking_uri)
    for version in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if (version.tags.get("step"), version.tags.get("registered_weights", "final")) == (str(meta["step"]),
                                                                                            weights):
            return f"models:/{name}/{version.version}"

    size = cfg.data.crop_size(train=False)
    example = np.random.default_rng(0).integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
    tags = {
        "val_top1": meta.get("val_top1"), "val_top5": meta.get("val_top5"), "epochs": meta["epoch"],
        "step": meta["step"], "dataset": dataset_name(cfg), "data_root": cfg.data.root,
        "blurpool": "true" if cfg.model.blurpool else None,
        "config_hash": config_hash(cfg), "run_id": run_id, "checkpoint_url": checkpoint_url,
        "input": "uint8 RGB images [N, H, W, 3] of any size, or encoded JPEG/PNG files",
        "output": "class_id, class_name, probability, top_k_ids, top_k_names, top_k_probabilities",
        "weights": f"weights/{step_folder(meta['step'])}" + ("" if weights == "final" else f"-{weights}"),
        "registered_weights": weights, "init_from": cfg.model.init_from,
        "averaged_steps": ",".join(map(str, meta["averaged_steps"])) if "averaged_steps" in meta else None,
    }
    tags = {key: str(value) for key, value in tags.items() if value is not None}
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory(prefix="register-") as scratch:
        exported = export_trained(trained, Path(scratch) / "export")
        # Explicit requirements: inferring them would load the model in a subprocess.
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy",
                        "pandas", "pillow"]
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).with_name("served_model.py")),
            artifacts={"program": str(exported["program"]), "metadata": str(exported["metadata"])},
            signature=served_signature(), input_example=example, pip_requirements=requirements)
        # The logged model's own metrics: its weights' scores (else MLflow's UI shows the run's first system
        # metrics on the model's page).
        scores = {key: float(meta[key]) for key in ("val_top1", "val_top5", "val_loss") if meta.get(key) is not None}
        mlflow.log_metrics(scores, step=int(meta["step"]), model_id=info.model_id)
        (Path(scratch) / "config.yaml").write_text(dump_config(cfg))
        mlflow.log_artifact(str(exported["state_dict"]), artifact_path=tags["weights"])  # the export's model.pt
        mlflow.log_artifact(str(Path(scratch) / "config.yaml"), artifact_path=tags["weights"])
        if meta.get("classes"):
            (Path(scratch) / CLASSES_FILE).write_text("".join(f"{name}\n" for name in meta["classes"]))
            mlflow.log_artifact(str(Path(scratch) / CLASSES_FILE), artifact_path=tags["weights"])
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    client.update_model_version(name, version.version, description=(
        f"{cfg.model.name} on {cfg.data.dataset}, {weights} weights of step {meta['step']} of run {run_id}: "
        f"val top-1 {tags.get('val_top1', '?')}. Input: {tags['input']}; output: {tags['output']}. "
        f"The raw torchvision state dict is the run's artifact {tags['weights']}/model.pt."))
    return f"models:/{name}/{version.version}"


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One version scored by the gate itself on held-out data."""

    scores: dict[str, float]
    """val_top1, val_top5, val_loss, val_images."""
    data: str
    """The data set's root (folder or URL)."""
    digest: str
    """`index_digest` of its val split: evaluations with the same digest scored the same images."""
    class_map_digest: str
    """`ClassMatch.digest`: which model output each of the set's classes was scored as."""

    def tags(self) -> dict[str, str]:
        """What the version records of it (`eval.*`)."""
        return {**{f"eval.{key}": f"{value:.6g}" for key, value in self.scores.items()}, "eval.data": self.data,
                "eval.data_digest": self.digest, "eval.class_map_digest": self.class_map_digest}


def evaluate_version(client: Any, uri: str, data: str, *, device: torch.device,
                     class_map: dict[str, str] | None = None) -> Evaluation:
    """Score registered model `uri` (models:/NAME/VERSION) on the val split of the indexed folder or URL `data`
    (or of the packed data set there), with its own evaluation preprocessing, in this process on `device`;
    classes matched by name (`class_map` renames folders first)."""
    from data_pipeline import packed_local_folder, prepare_dataset
    from data_pipeline.prepare import INDEX_FOLDER, index_digest, index_folder
    from data_pipeline.shards import is_packed

    trained = load_trained(uri, tracking_uri=client.tracking_uri)
    data_cfg = replace(trained.cfg.data, dataset="folder", root=data, index_dir=None)
    if is_packed(data):  # read from its shards; the index is the one `data prepare` wrote, so is its digest
        root, index_dir, folder = data, None, packed_local_folder(data_cfg) / INDEX_FOLDER
    else:  # staged once (a URL) here; the evaluation then reads the local copy
        staged, index_dir = prepare_dataset(data_cfg)
        root, folder = str(staged), index_folder(staged, index_dir)
    scored = evaluate_trained(trained, device=device, data_root=root,
                              overrides={"dataset": "folder", "index_dir": index_dir}, class_map=class_map)
    return Evaluation(scores=scored.scores, data=data, digest=index_digest(folder, "val"),
                      class_map_digest=scored.classes.digest)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the gate decided for moving `alias` to `version`."""

    name: str
    alias: str
    version: str
    accepted: bool
    reason: str
    previous: str | None
    """The version that held the alias before (None: no holder)."""
    evaluations: dict[str, Evaluation] | None = None
    """Version -> the gate's own scores (with --eval-data); None: the versions' tags were trusted."""

    def describe(self, *, dry_run: bool) -> str:
        what = f"{self.name} version {self.version} -> @{self.alias}"
        basis = "trusting the versions' own tags (no --eval-data)"
        if self.evaluations:
            scored = ", ".join(f"version {v} top-1 {e.scores['val_top1']:.4f}" for v, e in self.evaluations.items())
            first = next(iter(self.evaluations.values()))
            basis = (f"scored here on {first.data} ({first.scores['val_images']:.0f} images, index "
                     f"{first.digest}): {scored}")
        if not self.accepted:
            return f"{'would refuse' if dry_run else 'refused'}: {what}: {self.reason}; {basis}"
        if self.previous == self.version:
            return f"unchanged: {what}: it already holds the alias"
        return f"{'would promote' if dry_run else 'promoted'}: {what}: {self.reason}; {basis}"


def decide(client: Any, name: str, version: str, alias: str, *, metric: str, minimum: float | None,
           force: bool, max_regression: float = 0.0, eval_data: str | None = None,
           class_map: dict[str, str] | None = None,
           device: torch.device | None = None) -> Decision:
    """The gate: the candidate's `metric` must reach `minimum` and must not be below the current holder's by
    more than `max_regression`. With `eval_data` both versions are scored here, on that data, on `device`
    (which goes with it: the caller's), and those scores are compared; without it, the versions' `metric`
    tags are."""
    if RESERVED_ALIAS.match(alias):
        raise ConfigError(f"alias {alias!r} is reserved by MLflow (v<number>, latest): choose another, e.g. production")
    mlflow_exceptions = import_extra("mlflow.exceptions")
    # What the store answers for a name, version or alias it does not have; anything else (an unreachable
    # server) propagates to `promote`, which names the tracking URI.
    not_found = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
    try:
        candidate = client.get_model_version(name, version)
    except mlflow_exceptions.MlflowException as error:
        if error.error_code not in not_found:
            raise
        raise ConfigError(f"registered model {name!r} has no version {version!r}: {error.message}") from error
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except mlflow_exceptions.MlflowException as error:
        if error.error_code not in not_found:
            raise
        holder = None
    previous = None if holder is None else str(holder.version)
    evaluations = None
    if eval_data is not None:
        if device is None:
            raise ValueError("decide: eval_data is scored on the caller's device; none was given")
        versions = dict.fromkeys(str(v.version) for v in (candidate, holder) if v is not None)  # once each
        evaluations = {v: evaluate_version(client, f"models:/{name}/{v}", eval_data, device=device,
                                           class_map=class_map) for v in versions}

    def value(model_version: Any) -> float | None:
        if evaluations is not None:
            return evaluations[str(model_version.version)].scores.get(metric)
        raw = model_version.tags.get(metric)
        return None if raw is None else float(raw)

    score = value(candidate)
    held = None if holder is None else value(holder)
    problems = []
    if score is None:
        problems.append(f"version {version} has no {metric} tag")
    else:
        if minimum is not None and score < minimum:
            problems.append(f"{metric} {score:.4f} is below the floor {minimum:.4f}")
        if held is not None and score < held - max_regression:
            allowed = f" by more than {max_regression:.4f}" if max_regression else ""
            problems.append(f"{metric} {score:.4f} is worse than version {previous}'s {held:.4f}{allowed}, which "
                            f"holds @{alias}")
    if previous == str(version):
        return Decision(name, alias, str(version), True, "already holds the alias", previous, evaluations)
    if problems and not force:
        return Decision(name, alias, str(version), False, "; ".join(problems), previous, evaluations)
    if problems:
        reason = "forced despite: " + "; ".join(problems)
    else:
        reasons = [f"{metric} {score:.4f}"]
        if minimum is not None:
            reasons.append(f">= floor {minimum:.4f}")
        reasons.append((f">= version {previous}'s {held:.4f}" + (f" - {max_regression:.4f}" if max_regression else ""))
                       if held is not None else
                       f"(version {previous} held it without {metric})" if previous else "(no previous holder)")
        reason = " ".join(reasons)
    return Decision(name, alias, str(version), True, reason, previous, evaluations)


def promote(tracking_uri: str, name: str, version: str, alias: str, *, metric: str = "val_top1",
            minimum: float | None = None, force: bool = False, dry_run: bool = False, max_regression: float = 0.0,
            eval_data: str | None = None, device: torch.device | None = None,
            class_map: dict[str, str] | None = None) -> Decision:
    """Move `alias` of registered model `name` to `version` if the gate allows (see `decide`), recording the
    previous holder and the reason as tags of both versions; with `eval_data`, also each version's scores
    there (`eval.*`) and the decision (`<alias>.decision`), accepted or not; they are scored on `device`."""
    mlflow = import_extra("mlflow")
    mlflow_exceptions = import_extra("mlflow.exceptions")
    client = mlflow.MlflowClient(tracking_uri)
    try:
        decision = decide(client, name, version, alias, metric=metric, minimum=minimum, force=force,
                          max_regression=max_regression, eval_data=eval_data, device=device, class_map=class_map)
    except mlflow_exceptions.MlflowException as error:  # an unreachable server, a store that is not MLflow's
        raise ConfigError(f"tracking URI {tracking_uri}: {error.message}") from error
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if decision.evaluations is not None and not dry_run:
        for scored, evaluation in decision.evaluations.items():
            for key, value in {**evaluation.tags(), "eval.at": when,
                               f"{alias}.decision": decision.describe(dry_run=False)}.items():
                client.set_model_version_tag(name, scored, key, value)
    if dry_run or not decision.accepted or decision.previous == decision.version:
        return decision
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, f"{alias}.promoted_at", when)
    client.set_model_version_tag(name, version, f"{alias}.previous", decision.previous or "none")
    client.set_model_version_tag(name, version, f"{alias}.reason", decision.reason)
    if decision.previous is not None:
        client.set_model_version_tag(name, decision.previous, f"{alias}.replaced_by", f"version {version} at {when}")
    return decision


__all__ = ["Decision", "decide", "model_name", "promote",
           "register_model"]
