"""The run folder: one per run under launch.runs_dir, holding the resolved config and the summary."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from configs.loader import dump_config
from configs.schema import RunConfig
from data_pipeline.storage import atomic_write

METRICS_FILE = "metrics.jsonl"
"""In the run folder: every report of the run as a JSON line (trainer.metrics.JsonLinesSink)."""


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
    atomic_write(run_dir / "config.yaml", dump_config(cfg))  # a reader never sees half a config
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
