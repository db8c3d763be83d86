"""Where tracking goes: the MLflow store of a run or a command, and how long a call to it may take."""

from __future__ import annotations

import os
from pathlib import Path

from configs.extras import import_extra
from configs.schema import RunConfig
from data_pipeline.storage import TEMPORARY_MARK

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


def create_sqlite_store(uri: str) -> None:
    """Give a sqlite store that does not exist yet its tables all at once. MLflow builds a new database in
    dozens of migration steps on first use, and a process killed between two (a preempted worker) leaves a
    file that no later run can use. So the tables are built in a scratch file beside it, which is linked
    into place only when complete, never over a store that exists (another process may have made it
    meanwhile). Other URIs are left as they are."""
    if not uri.startswith("sqlite:///"):
        return
    database = Path(uri.removeprefix("sqlite:///"))
    if database.exists():
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    scratch = database.with_name(f"{database.name}{TEMPORARY_MARK}{os.getpid()}")
    scratch.unlink(missing_ok=True)  # left by a process of the same id that was killed
    sqlalchemy_store = import_extra("mlflow.store.tracking.sqlalchemy_store")
    store = sqlalchemy_store.SqlAlchemyStore(f"sqlite:///{scratch}", (database.parent / ARTIFACTS_FOLDER).as_uri())
    store.engine.dispose()
    try:
        os.link(scratch, database)
    except FileExistsError:
        pass
    finally:
        scratch.unlink()


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
