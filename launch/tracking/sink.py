"""MLflow tracking from the primary process, kept off the training step's critical path.

`MlflowSink` is a `MetricSink`: `log` only appends to a bounded in-memory buffer; a background thread
creates (or finds) the run, logs params and tags once, and sends the buffer in batches. When the server
is unreachable, the thread keeps the metrics and retries with backoff; past `max_buffered` it drops the
oldest and counts them (the count is logged as `tracking_dropped_metrics` once the server answers).
Nothing raises into the training loop, and HTTP calls give up after a few seconds.

With no `tracking.uri` the store is `sqlite:///<runs_dir>/mlflow.db` with artifacts in
`<runs_dir>/mlartifacts`: every run in that folder shows up in one `mlflow ui`, with a real model registry.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import platform
import threading
import time
from collections import deque
from importlib import metadata
from pathlib import Path
from typing import Any

from configs.extras import import_extra
from configs.loader import config_to_dict
from configs.schema import RunConfig
from launch.tracking.store import ARTIFACTS_FOLDER, create_sqlite_store, limit_http_calls, tracking_uri

RUN_FILE = "mlflow_run.json"
"""In the run folder: the tracking URI and MLflow run id of this training run. The same record is in each
checkpoint's manifest (meta key `mlflow`), so that a restarted run, or a new run started from another's
checkpoints, continues the same MLflow run."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"optim": {"lr": 0.1}}` -> `{"optim.lr": "0.1"}`."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


def config_hash(cfg: RunConfig) -> str:
    """A short fingerprint of the resolved config: what trains the model, without the run's name, output
    paths and tracking settings."""
    tree = config_to_dict(cfg)
    del tree["tracking"]
    tree["launch"] = {k: v for k, v in tree["launch"].items() if k not in ("name", "runs_dir", "ray_address")}
    tree["checkpoint"] = {k: v for k, v in tree["checkpoint"].items() if k != "url"}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def _environment_tags(world_size: int, device: str) -> dict[str, str]:
    # MLflow's own tags (mlflow.user, mlflow.source.*) fill the UI's "Created by", "Source" and commit.
    tags = {"world_size": str(world_size), "device": device, "host": platform.node(),
            "python": platform.python_version(), "mlflow.source.name": "python -m launch train",
            "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # a container user without a name
        pass
    for package in ("torch", "torchvision", "nvidia-dali-cuda130", "deepspeed", "ray", "mlflow"):
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    try:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5, check=False).stdout.strip()
        if commit:
            tags["git_commit"] = tags["mlflow.source.git.commit"] = commit
    except OSError:
        pass
    return tags


class MlflowSink:
    """Sends metrics to one MLflow run from a background thread; see the module docstring."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, world_size: int, device: str,
                 checkpointed: dict[str, str] | None = None, max_buffered: int = 100_000,
                 request_timeout_s: int = 5) -> None:
        """`device`: the primary process's training device (cpu, cuda:3), tagged. `checkpointed`: the `mlflow`
        record of the checkpoint the run resumes from, if any."""
        # Retries are the background thread's own (with backoff); a call gives up in seconds.
        limit_http_calls(timeout_s=request_timeout_s, max_retries=0)
        self.mlflow = import_extra("mlflow")
        self.cfg = cfg
        self.run_dir = run_dir
        self.uri = tracking_uri(cfg)
        create_sqlite_store(self.uri)  # before any metric is queued: a kill from here on cannot damage it
        self.tags = {**_environment_tags(world_size, device), "config_hash": config_hash(cfg)}
        self.max_buffered = max_buffered
        self.buffer: deque[Any] = deque()
        self.dropped = 0
        self.run_id: str | None = self._saved_run_id(checkpointed)
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._monitor: Any = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="mlflow-sink", daemon=True)
        self._thread.start()

    def _saved_run_id(self, checkpointed: dict[str, str] | None) -> str | None:
        """The run to continue: the checkpoint's, else the run folder's (a run that failed before its first
        checkpoint knew the id), if recorded for this tracking URI."""
        try:
            in_folder = json.loads((self.run_dir / RUN_FILE).read_text())
        except (FileNotFoundError, ValueError):
            in_folder = None
        for saved in (checkpointed, in_folder):
            if saved is not None and saved.get("tracking_uri") == self.uri:
                return saved["run_id"]
        return None

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint's manifest records of this run (nothing until the run exists on the server)."""
        run_id = self.run_id
        return {} if run_id is None else {"mlflow": {"tracking_uri": self.uri, "run_id": run_id}}

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue `metrics` at `step` (returns at once)."""
        entities = import_extra("mlflow.entities")
        now_ms = int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                self.buffer.append(entities.Metric(key, float(value), now_ms, step))
                self.history.setdefault(key, []).append((step, float(value)))
            while len(self.buffer) > self.max_buffered:
                self.buffer.popleft()
                self.dropped += 1
        self._wake.set()

    def on_checkpoint(self, step: int, url: str) -> None:
        """Nothing to send: the checkpoint's URL is in the run's summary."""

    def close(self, *, status: str = "FINISHED", timeout_s: float = 60.0) -> bool:
        """Send what is buffered, the config and a plot of the curves, and end the run; give up after
        `timeout_s`. True if everything was delivered."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=timeout_s)
        if self._monitor is not None:
            self._monitor.finish()
        if self._thread.is_alive() or self.run_id is None:
            print(f"mlflow: {self.uri} did not answer within {timeout_s:.0f} s at the end; {len(self.buffer)} "
                  "metrics were not delivered", flush=True)
            return False
        try:
            client = self.mlflow.MlflowClient(self.uri)
            (self.run_dir / "curves.png").write_bytes(plot_curves(self.history))
            client.log_artifact(self.run_id, str(self.run_dir / "curves.png"))
            client.log_artifact(self.run_id, str(self.run_dir / "config.yaml"))
            client.set_terminated(self.run_id, status)
            return True
        except Exception as error:  # an outage at the very end loses only the artifacts, never the run
            print(f"mlflow: could not finish run {self.run_id} at {self.uri}: {error}", flush=True)
            return False

    def _work(self) -> None:
        backoff_s = 1.0
        while True:
            if not self._closing:
                self._wake.wait(timeout=5.0)
                self._wake.clear()
            try:
                self._send()
                backoff_s = 1.0
            except Exception:
                # Closing: keep trying until close() stops waiting (the server may be coming back).
                time.sleep(1.0 if self._closing else backoff_s)
                backoff_s = min(backoff_s * 2, 30.0)
                continue
            if self._closing:
                return

    def _send(self) -> None:
        client = self.mlflow.MlflowClient(self.uri)
        if self.run_id is None:
            self.run_id = self._create_run(client)
        if self._monitor is None:
            # Continuing a run (a restart or --resume) marks it running again, with this attempt's environment
            # and config hash (a resume may have changed the world size or the number of epochs).
            client.update_run(self.run_id, status="RUNNING")
            entities = import_extra("mlflow.entities")
            client.log_batch(self.run_id, tags=[entities.RunTag(key, value) for key, value in self.tags.items()])
            self._start_system_metrics()
        if dropped := self.dropped:
            client.log_metric(self.run_id, "tracking_dropped_metrics", dropped)
            with self._lock:  # counted as reported only once the server has it
                self.dropped -= dropped
        while self.buffer:
            with self._lock:
                batch = [self.buffer.popleft() for _ in range(min(len(self.buffer), 1000))]
            try:
                client.log_batch(self.run_id, metrics=batch)
            except Exception:
                with self._lock:
                    self.buffer.extendleft(reversed(batch))
                raise

    def _start_system_metrics(self) -> None:
        """CPU, memory, disk, network (and GPU with nvidia-ml-py) every 10 s, logged by MLflow's own thread.
        They describe the primary's node: GPU metrics cover every GPU there (gpu_<NVML index>_*), the
        training device's index is in the `device` tag."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, tracking_uri=self.uri,
                                             resume_logging=True)
        self._monitor.start()

    def _create_run(self, client: Any) -> str:
        experiment = client.get_experiment_by_name(self.cfg.tracking.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None
            if self.cfg.tracking.uri is None:
                artifacts = (Path(self.cfg.launch.runs_dir).resolve() / ARTIFACTS_FOLDER).as_uri()
            experiment_id = client.create_experiment(self.cfg.tracking.experiment, artifact_location=artifacts)
        run = client.create_run(experiment_id, run_name=self.cfg.launch.name, tags=self.tags)
        entities = import_extra("mlflow.entities")
        params = [entities.Param(key, value[:6000]) for key, value in flatten(config_to_dict(self.cfg)).items()]
        for start in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[start:start + 100])
        run_id = str(run.info.run_id)
        (self.run_dir / RUN_FILE).write_text(json.dumps({"tracking_uri": self.uri, "run_id": run_id}))
        return run_id


def plot_curves(history: dict[str, list[tuple[int, float]]]) -> bytes:
    """A PNG of `curves_figure`."""
    import io

    import matplotlib.pyplot as plt

    figure = curves_figure(history)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def curves_figure(history: dict[str, list[tuple[int, float]]]) -> Any:
    """Training and validation loss (log scale), learning rate and validation accuracy against the global
    step, as a matplotlib figure of three panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", ["loss", "val_loss"]), ("lr", ["lr"]), ("accuracy", ["val_top1", "val_top5"])]
    figure, axes = plt.subplots(1, len(panels), figsize=(12, 3.5))
    for axis, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            if points := history.get(key):
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, marker="." if len(points) < 30 else None, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        if title == "loss" and axis.lines:
            # Log scale: one early val_loss spike would otherwise flatten the training loss to a line.
            axis.set_yscale("log")
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    return figure


__all__ = ["MlflowSink", "config_hash", "flatten", "plot_curves"]
