"""Where tracking goes: the MLflow store of a run or a command, and how long a call to it may take."""

from __future__ import annotations

import os
from pathlib import Path

from configs.schema import RunConfig

EMBEDDED_STORE_FILE = "mlflow.db"
"""The embedded sqlite store's file under launch.runs_dir, used when tracking.uri is not set."""
ARTIFACTS_FOLDER = "mlartifacts"
"""Where the embedded store's artifacts go, under launch.runs_dir."""


def embedded_store_uri(runs_dir: str | Path) -> str:
    """The embedded store of the runs folder `runs_dir`: every run there shows up in one `mlflow ui`, with a
    real model registry."""
    return f"sqlite:///{Path(runs_dir).resolve() / EMBEDDED_STORE_FILE}"


def tracking_uri(cfg: RunConfig) -> str:
    """`tracking.uri`, or the embedded store under launch.runs_dir."""
    return cfg.tracking.uri or embedded_store_uri(cfg.launch.runs_dir)


def command_tracking_uri(given: str | None) -> str:
    """The store a command (eval, export, promote) talks to: `given` (--tracking-uri), else
    $MLFLOW_TRACKING_URI, else the embedded store of the default runs folder, which must exist."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is not None:
        return uri
    runs_dir = RunConfig().launch.runs_dir
    database = Path(runs_dir).resolve() / EMBEDDED_STORE_FILE
    if not database.is_file():
        raise FileNotFoundError(f"no tracking store at {database}: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return embedded_store_uri(runs_dir)


def limit_http_calls(*, timeout_s: int, max_retries: int) -> None:
    """Make MLflow's HTTP calls to a dead server fail in seconds, not minutes (unless the user set the limits
    in the environment). Must run before the first request."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
