"""MLflow tracking against a real `mlflow server` (sqlite backend, local artifacts) on 127.0.0.1: a run logs its
config, environment, metrics and artifacts; a resumed run continues the same MLflow run; a server that dies
mid-run and comes back gets every metric, and training never stops for it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multiproc import free_port

pytest.importorskip("mlflow")
pytestmark = [pytest.mark.mlflow, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


class Server:
    """An `mlflow server` process that can be stopped and started again on the same port and store."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline and self.process.poll() is None, "mlflow server did not start"
            time.sleep(0.5)

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=60)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path / "server")
    running.folder.mkdir()
    running.start()
    yield running
    if running.process is not None and running.process.poll() is None:
        running.stop()


def train(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "launch", "train", "--launcher", "torchrun", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def common(root: Path, runs: Path, uri: str, name: str) -> list[str]:
    return [f"data.root={root}", "data.image_size=8", "data.batch_size=64", "data.num_workers=1",
            "tracking.log_interval_steps=5", f"tracking.uri={uri}", "tracking.experiment=tests",
            f"launch.runs_dir={runs}", f"launch.name={name}"]


def finished(process: subprocess.Popen[bytes]) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output.decode(errors="replace")[-4000:]
    return output.decode(errors="replace")


def test_a_run_is_recorded_and_a_resumed_run_continues_it(server: Server, digits_root: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    finished(train(*common(digits_root, tmp_path / "runs", server.uri, "first")))
    run_id = json.loads((tmp_path / "runs" / "first" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["data.batch_size"] == "64"
    assert run.data.tags["world_size"] == "1" and "version.torch" in run.data.tags and "config_hash" in run.data.tags
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [5, 10, 15, 20, 22]
    assert [m.step for m in client.get_metric_history(run_id, "val_top1")] == [22]
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "curves.png"}

    # Continue the same run for a second epoch: the same MLflow run, global steps going on.
    finished(train("--resume", "first", f"launch.runs_dir={tmp_path / 'runs'}", "schedule.epochs=2"))
    assert json.loads((tmp_path / "runs" / "first" / "mlflow_run.json").read_text())["run_id"] == run_id
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [5, 10, 15, 20, 22, 25, 30, 35, 40, 44]
    assert [m.step for m in client.get_metric_history(run_id, "val_top1")] == [22, 44]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_server_outage_mid_run_loses_no_metric(server: Server, digits_root: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    process = train(*common(digits_root, tmp_path / "runs", server.uri, "outage"), "schedule.epochs=3")
    metrics = tmp_path / "runs" / "outage" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (tmp_path / "runs" / "outage" / "mlflow_run.json").is_file() or not metrics.is_file():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    server.stop()  # dies mid-run, training goes on
    while len(metrics.read_text().splitlines()) < 8:
        assert time.monotonic() < deadline and process.poll() is None, "training stalled without the server"
        time.sleep(0.2)
    server.start()  # back, with the same store
    finished(process)
    run_id = json.loads((tmp_path / "runs" / "outage" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(server.uri)
    expected = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == expected
    assert [m.step for m in client.get_metric_history(run_id, "val_top1")] == [22, 44, 66]
    assert client.get_run(run_id).info.status == "FINISHED"
