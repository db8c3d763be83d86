"""The run folder: one per run under launch.runs_dir, holding the resolved config and the summary."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from configs.loader import dump_config
from configs.schema import RunConfig


def create_run_dir(cfg: RunConfig) -> tuple[RunConfig, Path]:
    """Make `<runs_dir>/<name>/` and save the resolved config there as config.yaml.

    Returns the config with launch.name and checkpoint.url filled in (a generated name when none was set;
    checkpoints under the run folder when no URL was set) and the folder,
    as an absolute path so that workers in other working directories find it.
    """
    name = cfg.launch.name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    run_dir = Path(cfg.launch.runs_dir).resolve() / name
    if run_dir.exists():
        raise FileExistsError(f"run folder {run_dir} already exists: choose another launch.name")
    run_dir.mkdir(parents=True)
    checkpoint_url = cfg.checkpoint.url or str(run_dir / "checkpoints")
    cfg = dataclasses.replace(cfg, launch=dataclasses.replace(cfg.launch, name=name),
                              checkpoint=dataclasses.replace(cfg.checkpoint, url=checkpoint_url))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return cfg, run_dir


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write `summary.json` in the run folder, for scripts and CI systems that drive the trainer."""
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
