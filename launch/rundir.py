"""The run folder: one per run under launch.runs_dir, holding the resolved config and the summary."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from configs.loader import dump_config
from configs.schema import RunConfig


def open_run_dir(cfg: RunConfig, *, resume: bool = False) -> tuple[RunConfig, Path]:
    """The run folder `<runs_dir>/<name>/` and the config to run in it, with every local path absolute (Ray
    workers and torchrun processes may start in other working directories).

    A new run (`resume=False`) gets a generated name when none was set, checkpoints under its folder when
    no checkpoint.url was set, and its resolved config saved as config.yaml; an existing folder is refused,
    so that a name is never reused by accident. `resume=True` continues the existing folder of `cfg`'s name
    (whose config.yaml the caller loaded, and which is rewritten: overrides given to the resumed run, such
    as more epochs, hold for later resumes too).
    """
    name = cfg.launch.name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    run_dir = Path(cfg.launch.runs_dir).resolve() / name
    if resume and not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"no run to resume at {run_dir} (config.yaml missing)")
    if not resume and run_dir.exists():
        raise FileExistsError(f"run folder {run_dir} already exists: choose another launch.name, or continue it "
                              f"with --resume {name}")
    checkpoint_url = _absolute(cfg.checkpoint.url or str(run_dir / "checkpoints"))
    cfg = dataclasses.replace(
        cfg,
        launch=dataclasses.replace(cfg.launch, name=name, runs_dir=str(run_dir.parent)),
        data=dataclasses.replace(cfg.data, root=_absolute(cfg.data.root),
                                 index_dir=_absolute(cfg.data.index_dir) if cfg.data.index_dir else None),
        checkpoint=dataclasses.replace(cfg.checkpoint, url=checkpoint_url),
    )
    if not resume:
        run_dir.mkdir(parents=True)
    written = run_dir / "config.yaml.tmp"
    written.write_text(dump_config(cfg))
    written.replace(run_dir / "config.yaml")  # a reader never sees half a config
    return cfg, run_dir


def find_run(runs_dir: str, which: str) -> Path | None:
    """The folder of run `which`: a run name under `runs_dir`, "latest" (the newest run there) or a run
    folder's path; None if `which` is none of these (it may then be a checkpoint URL)."""
    runs = Path(runs_dir)
    if which == "latest":
        folders = [p.parent for p in runs.glob("*/config.yaml")]
        if not folders:
            raise FileNotFoundError(f"--resume latest: no runs under {runs.resolve()}")
        return max(folders, key=lambda folder: (folder / "config.yaml").stat().st_mtime)
    for candidate in (runs / which, Path(which)):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def _absolute(path_or_url: str) -> str:
    """A local path made absolute; URLs (anything with '://') unchanged."""
    return path_or_url if "://" in path_or_url else str(Path(path_or_url).expanduser().resolve())


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write `summary.json` in the run folder, for scripts and CI systems that drive the trainer."""
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def ui_command(tracking_uri: str) -> str:
    """How to browse a tracking store: `mlflow ui` over an embedded store, the server's address otherwise."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    beside_python = Path(sys.executable).with_name("mlflow")  # this environment's own mlflow command
    command = "mlflow"
    if beside_python.is_file():
        relative = os.path.relpath(beside_python)
        command = str(beside_python) if relative.startswith("..") else relative
    return f"{command} ui --backend-store-uri {tracking_uri}"


def format_summary(summary: dict[str, Any]) -> str:
    """A two-column table of the numbers a user looks at first."""
    rows = [
        ("model", summary["model"]),
        ("device", f"{summary['device']} x {summary['world_size']}"),
        ("epochs / steps", f"{summary['epochs']} / {summary['steps']}"),
        ("train images/s", f"{summary['images_per_s']:.1f}"),
        ("train time", f"{summary['train_time_s']:.1f} s (wall {summary['wall_time_s']:.1f} s)"),
        ("val top-1", f"{100 * summary['val_top1']:.2f}% of {int(summary['val_images'])} images"),
        ("val top-5", f"{100 * summary['val_top5']:.2f}%"),
        ("val loss", f"{summary['val_loss']:.4f}"),
        ("checkpoint", summary["checkpoint_url"]),
        ("run folder", summary["run_dir"]),
    ]
    if summary.get("tracking_uri"):
        rows.append(("mlflow run", f"{summary['mlflow_run_id']} at {summary['tracking_uri']}"))
        rows.append(("registered as", summary.get("model_uri") or "not registered (see the messages above)"))
        if summary.get("promotion"):
            rows.append(("promotion", summary["promotion"]))
        rows.append(("look at it", ui_command(summary["tracking_uri"])))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
