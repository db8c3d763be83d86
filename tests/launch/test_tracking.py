"""MLflow tracking and the registry against a real `mlflow server` (sqlite backend, local artifacts) on 127.0.0.1:
a run logs its config, environment, metrics and artifacts; a resumed run continues the same MLflow run; each
finished run registers a model a fresh process predicts with; the promotion gate moves an alias only for a model
that is not worse; a server that dies mid-run and comes back gets every metric, and training never stops for it."""

from __future__ import annotations

import getpass
import json
import math
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configs import ConfigError, RunConfig, load_config
from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from tests.multiproc import free_port
from trainer.checkpoint import open_checkpoints

# `make test` installs the mlflow extra: without it these tests must fail to import, not skip.
import mlflow  # noqa: F401, E402

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


class Server:
    """An `mlflow server` process that can be stopped and started again on the same port and store."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = Path(sys.executable).parent / "mlflow"
        self.process = subprocess.Popen(
            [str(command), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
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


def load_config_of(run_dir: Path) -> RunConfig:
    return load_config(run_dir / "config.yaml", [])


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
    return [f"data.root={root}", "data.image_size=8", "data.batch_size=64",
            "data.dali_threads=1", "data.loader_workers=1", "schedule.epochs=1",
            "tracking.promote_alias=null",
            "tracking.log_interval_steps=5", f"tracking.uri={uri}", "tracking.experiment=tests",
            f"launch.runs_dir={runs}", f"launch.name={name}"]


def finished(process: subprocess.Popen[bytes]) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output.decode(errors="replace")[-4000:]
    return output.decode(errors="replace")


@pytest.fixture(scope="module")
def recorded(module_tmp: Path, digits_root: Path) -> Iterator[tuple[Server, Path]]:
    """A server that saw run "first" train one epoch, then continue (--resume) for a second: (server, runs)."""
    running = Server(module_tmp / "server")
    running.folder.mkdir()
    running.start()
    runs = module_tmp / "runs"
    finished(train(*common(digits_root, runs, running.uri, "first")))
    finished(train("--resume", "first", f"launch.runs_dir={runs}", "schedule.epochs=2"))
    yield running, runs
    running.stop()


def test_a_run_is_recorded_and_a_resumed_run_continues_it(recorded: tuple[Server, Path]) -> None:
    from mlflow import MlflowClient

    server, runs = recorded
    run_id = json.loads((runs / "first" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.params["optim.lr"] == "0.2" and run.data.params["data.batch_size"] == "64"
    assert run.data.tags["world_size"] == "1" and "version.torch" in run.data.tags and "config_hash" in run.data.tags
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "curves.png"}
    # MLflow's own tags, which its UI shows as "Created by", "Source" and the commit.
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["mlflow.user"] == getpass.getuser() and run.data.tags["mlflow.source.git.commit"] == commit
    assert run.data.tags["mlflow.source.name"] == "python -m launch train"

    # The second epoch went on in the same MLflow run (its id is in every checkpoint), global steps going on.
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [5, 10, 15, 20, 22, 25, 30, 35, 40, 44]
    # Each epoch's evaluation, and each registration's score of its version (logged against the logged model,
    # which MLflow records in the run as well, at the same step and value).
    history = client.get_metric_history(run_id, "val_top1")
    assert sorted(m.step for m in history) == [22, 22, 44, 44]
    assert len({(m.step, m.value) for m in history}) == 2
    manifest = open_checkpoints(str(runs / "first" / "checkpoints"), keep_last=1).latest()
    assert manifest is not None and manifest.meta["mlflow"] == {"tracking_uri": server.uri, "run_id": run_id}
    summary = json.loads((runs / "first" / "summary.json").read_text())
    assert summary["tracking_uri"] == server.uri and summary["mlflow_run_id"] == run_id


def test_the_loss_panel_is_log_scale_so_an_early_val_loss_spike_leaves_the_training_loss_readable() -> None:
    from launch.tracking.sink import curves_figure

    figure = curves_figure({"loss": [(1, 2.3), (10, 0.5), (20, 0.02)], "val_loss": [(10, 400.0), (20, 0.05)],
                            "lr": [(1, 0.1), (20, 0.01)], "val_top1": [(10, 0.1), (20, 0.98)]})
    loss, lr, accuracy = figure.axes
    assert loss.get_yscale() == "log" and lr.get_yscale() == accuracy.get_yscale() == "linear"
    # The training loss spans most of the panel's height instead of a flat line under the spike.
    low, high = (math.log10(limit) for limit in loss.get_ylim())
    assert (math.log10(2.3) - math.log10(0.02)) / (high - low) > 0.4


def test_a_checkpoint_names_the_run_to_continue(tmp_path: Path) -> None:
    """A new run folder started from another run's checkpoints continues the MLflow run its checkpoint names."""
    from configs import load_config
    from launch.tracking.sink import MlflowSink

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens: the sink only queues
    cfg = load_config("quickstart", [f"tracking.uri={uri}"])
    sink = MlflowSink(cfg, tmp_path, world_size=1, device="cpu", checkpointed={"tracking_uri": uri, "run_id": "abc"})
    assert sink.run_id == "abc" and sink.checkpoint_meta() == {"mlflow": {"tracking_uri": uri, "run_id": "abc"}}
    elsewhere = MlflowSink(cfg, tmp_path, world_size=1, device="cpu",
                           checkpointed={"tracking_uri": "http://other:5000", "run_id": "abc"})
    assert elsewhere.run_id is None and elsewhere.checkpoint_meta() == {}
    for started in (sink, elsewhere):
        assert not started.close(timeout_s=0.1)


PREDICT = """
import sys, mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
np.save(sys.argv[4], model.predict(np.load(sys.argv[3]))["class_id"].to_numpy())
"""


def val_images(root: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every val image as uint8 RGB [N, size, size, 3], and its class id."""
    classes = sorted(p.name for p in (root / "val").iterdir())
    files = sorted((root / "val").glob("*/*.JPEG"))
    images = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)) for f in files]
    return np.stack(images), np.array([classes.index(f.parent.name) for f in files])


def test_each_finished_run_registers_a_version_a_fresh_process_predicts_with(
        recorded: tuple[Server, Path], digits_root: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from launch.tracking.sink import config_hash
    from trainer.models import build_model

    server, runs = recorded
    run_id = json.loads((runs / "first" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(server.uri)
    versions = sorted(client.search_model_versions("name='resnet18-digits'"), key=lambda v: int(v.version))
    assert [(v.version, v.tags["step"], v.tags["run_id"]) for v in versions] == [("1", "22", run_id),
                                                                                ("2", "44", run_id)]
    latest = versions[-1]
    assert latest.tags["dataset"] == "digits" and latest.tags["epochs"] == "2.0"
    assert latest.tags["config_hash"] == config_hash(load_config_of(runs / "first"))  # the 2-epoch config
    summary = json.loads((runs / "first" / "summary.json").read_text())
    assert summary["model_uri"] == "models:/resnet18-digits/2"
    assert float(latest.tags["val_top1"]) == summary["val_top1"]

    # A fresh process with nothing but mlflow: uint8 images in, class ids out.
    images, labels = val_images(digits_root, 8)
    np.save(tmp_path / "images.npy", images)
    subprocess.run([sys.executable, "-c", PREDICT, server.uri, "models:/resnet18-digits/2",
                    str(tmp_path / "images.npy"), str(tmp_path / "ids.npy")], check=True, timeout=300, cwd=tmp_path)
    ids = np.load(tmp_path / "ids.npy")
    assert ids.shape == labels.shape and ids.dtype == np.int64
    # The same ids as the raw torchvision-layout weights registered beside it, normalised by hand.
    assert latest.tags["weights"] == "weights/step_000000044"
    weights = Path(client.download_artifacts(run_id, latest.tags["weights"], str(tmp_path)))
    state = torch.load(weights / "model.pt", weights_only=True)
    network = build_model(load_config(weights / "config.yaml").model)
    network.load_state_dict(state)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        expected = network.eval()((pixels - mean) / std).argmax(1).numpy()
    assert (ids == expected).mean() >= 0.99
    # PIL's resize is not DALI's: the accuracy is close to, not equal to, the run's evaluation.
    assert abs((ids == labels).mean() - summary["val_top1"]) < 0.05


def test_promotion_moves_the_alias_only_through_the_gate(recorded: tuple[Server, Path]) -> None:
    from mlflow import MlflowClient

    from launch.tracking.registry import promote

    server, _ = recorded
    client = MlflowClient(server.uri)
    score = {v: float(client.get_model_version("resnet18-digits", v).tags["val_top1"]) for v in ("1", "2")}
    better, worse = sorted(score, key=score.__getitem__, reverse=True)
    assert score[better] > score[worse], score  # one epoch more of training

    decision = promote(server.uri, "resnet18-digits", worse, "production", minimum=score[worse] + 0.01, dry_run=True)
    assert not decision.accepted and "below the floor" in decision.reason
    assert promote(server.uri, "resnet18-digits", worse, "production").accepted
    holder = client.get_model_version_by_alias("resnet18-digits", "production")
    assert holder.version == worse and holder.tags["production.previous"] == "none"

    # A dry run moves nothing; the command-line gate accepts the better version and records why.
    assert promote(server.uri, "resnet18-digits", better, "production", dry_run=True).accepted
    assert client.get_model_version_by_alias("resnet18-digits", "production").version == worse
    command = [sys.executable, "-m", "launch", "promote", "resnet18-digits", "--alias", "production",
               "--tracking-uri", server.uri, "--min", "0.1"]
    accepted = subprocess.run([*command, "--version", better], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert accepted.returncode == 0, accepted.stderr
    assert f"promoted: resnet18-digits version {better} -> @production" in accepted.stdout
    holder = client.get_model_version_by_alias("resnet18-digits", "production")
    assert holder.version == better and holder.tags["production.previous"] == worse
    assert f"version {better}" in client.get_model_version("resnet18-digits", worse).tags["production.replaced_by"]

    # Going back to the worse model is refused (exit 5) unless forced.
    refused = subprocess.run([*command, "--version", worse], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 5
    assert f"is worse than version {better}'s" in refused.stdout
    assert client.get_model_version_by_alias("resnet18-digits", "production").version == better
    forced = promote(server.uri, "resnet18-digits", worse, "production", force=True)
    assert forced.accepted and forced.reason.startswith("forced despite")
    assert client.get_model_version_by_alias("resnet18-digits", "production").version == worse

    with pytest.raises(ConfigError, match="reserved"):
        promote(server.uri, "resnet18-digits", better, "v2")
    with pytest.raises(ConfigError, match="no version '9'"):
        promote(server.uri, "resnet18-digits", "9", "production")


def tampered_version(server: Server, runs: Path, tmp_path: Path) -> str:
    """A version whose weights score at chance (the classifier zeroed) but whose val_top1 tag claims 0.999,
    registered from a copy of run "first"'s checkpoint under a run of its own."""
    from mlflow import MlflowClient

    from launch.tracking.artifacts import load_trained
    from launch.tracking.registry import register_model
    from trainer.state import from_bytes, to_bytes

    copy = tmp_path / "tampered"
    shutil.copytree(runs / "first" / "checkpoints", copy, ignore=shutil.ignore_patterns("writers"))
    manager = open_checkpoints(str(copy))
    latest = manager.latest()
    assert latest is not None
    weights = from_bytes(manager.read(latest.step, "model.pt"))
    weights["fc.weight"].zero_()
    weights["fc.bias"].zero_()
    files = {name: manager.read(latest.step, name) for name in latest.files}
    manager.save(latest.step + 1, {**files, "model.pt": to_bytes(weights)}, {**latest.meta, "val_top1": 0.999})
    client = MlflowClient(server.uri)
    run_id = client.create_run(client.get_experiment_by_name("tests").experiment_id).info.run_id
    cfg = load_trained(str(copy)).cfg
    return register_model(cfg, tracking_uri=server.uri, run_id=run_id, checkpoint_url=str(copy)).rsplit("/", 1)[1]


def test_the_gate_can_score_candidate_and_holder_itself_on_held_out_data(recorded: tuple[Server, Path],
                                                                          digits_root: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from data_pipeline.prepare import index_digest, index_folder
    from launch.tracking.artifacts import evaluate_trained, load_trained
    from launch.tracking.class_match import ClassMatch
    from launch.tracking.registry import promote

    server, runs = recorded
    client = MlflowClient(server.uri)
    assert promote(server.uri, "resnet18-digits", "1", "gated").accepted  # the holder to beat
    command = [sys.executable, "-m", "launch", "promote", "resnet18-digits", "--alias", "gated", "--version", "2",
               "--tracking-uri", server.uri, "--eval-data", str(digits_root)]
    gated = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    # Both versions were scored here, on the same images, and recorded it.
    scores = {}
    for version in ("1", "2"):
        tags = client.get_model_version("resnet18-digits", version).tags
        assert tags["eval.val_images"] == "355" and tags["eval.data"] == str(digits_root)
        assert tags["eval.data_digest"] == index_digest(index_folder(digits_root, None), "val")
        # The digits set's classes are the model's, in its order: the identity mapping, and its digest recorded.
        assert tags["eval.class_map_digest"] == ClassMatch(tuple(range(10)), "").digest
        assert tags["gated.decision"].startswith("promoted" if gated.returncode == 0 else "refused")
        scores[version] = float(tags["eval.val_top1"])
    # The same score as evaluating the registered weights by hand (the tag is rounded to 6 digits).
    by_hand = evaluate_trained(load_trained("models:/resnet18-digits/2", tracking_uri=server.uri), device=CPU,
                               data_root=str(digits_root)).scores
    assert scores["2"] == pytest.approx(by_hand["val_top1"], abs=1e-6)
    # Accepted exactly when the candidate scored at least the holder's, and the output says so.
    assert (gated.returncode == 0) == (scores["2"] >= scores["1"]), gated.stdout + gated.stderr
    assert f"scored here on {digits_root} (355 images, index" in gated.stdout
    # Refused by the floor all the same, and without --eval-data the tags are trusted and it says so.
    refused = promote(server.uri, "resnet18-digits", "2", "floored", minimum=1.0, eval_data=str(digits_root),
                      dry_run=True, device=CPU)
    assert not refused.accepted and "below the floor" in refused.reason
    # The same set packed into shards (`data pack`) is scored from them: the same images, index and scores.
    from data_pipeline.shards import pack_dataset

    pack_dataset(digits_root, str(tmp_path / "packed"), shard_mb=0.1, log=lambda line: None)
    from_shards = promote(server.uri, "resnet18-digits", "2", "floored", minimum=1.0,
                          eval_data=str(tmp_path / "packed"), dry_run=True, device=CPU)
    assert from_shards.evaluations is not None and refused.evaluations is not None
    assert from_shards.evaluations["2"].digest == refused.evaluations["2"].digest
    assert from_shards.evaluations["2"].scores == refused.evaluations["2"].scores
    trusted = promote(server.uri, "resnet18-digits", "2", "trusting", dry_run=True)
    assert "trusting the versions' own tags (no --eval-data)" in trusted.describe(dry_run=True)

    # A candidate whose tag claims better than the holder but whose weights score worse: a gate that
    # compared tags would let it through (the control), the gate that scores them refuses it.
    tampered = tampered_version(server, runs, tmp_path)
    holder = client.get_model_version_by_alias("resnet18-digits", "gated").version
    assert promote(server.uri, "resnet18-digits", tampered, "gated", dry_run=True).accepted  # trusting its tag
    scored = promote(server.uri, "resnet18-digits", tampered, "gated", eval_data=str(digits_root), dry_run=True,
                     device=CPU)
    assert scored.evaluations is not None
    real, held = scored.evaluations[tampered].scores["val_top1"], scored.evaluations[holder].scores["val_top1"]
    assert real < 0.5 < held and not scored.accepted and f"worse than version {holder}'s" in scored.reason
    # A holder better by less than --max-regression lets the worse candidate through; by more, not.
    allowed = promote(server.uri, "resnet18-digits", tampered, "gated", eval_data=str(digits_root), dry_run=True,
                      device=CPU, max_regression=held - real + 0.001)
    assert allowed.accepted
    assert not promote(server.uri, "resnet18-digits", tampered, "gated", eval_data=str(digits_root), dry_run=True,
                       device=CPU, max_regression=held - real - 0.001).accepted


def test_a_server_outage_mid_run_loses_no_metric(server: Server, digits_root: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    process = train(*common(digits_root, tmp_path / "runs", server.uri, "outage"), "schedule.epochs=3",
                    "tracking.register=false")
    metrics = tmp_path / "runs" / "outage" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (tmp_path / "runs" / "outage" / "mlflow_run.json").is_file() or not metrics.is_file():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    server.stop()  # dies mid-run, training goes on
    with pytest.raises(OSError):  # the outage is real
        urllib.request.urlopen(f"{server.uri}/health", timeout=2)
    reports_before = len(metrics.read_text().splitlines())
    while len(metrics.read_text().splitlines()) < reports_before + 4:
        assert time.monotonic() < deadline and process.poll() is None, "training stalled without the server"
        time.sleep(0.2)
    during = [json.loads(line)["step"] for line in metrics.read_text().splitlines()[reports_before:]]
    assert during == sorted(during) and during[-1] > during[0]  # steps trained while the server was down
    server.start()  # back, with the same store
    finished(process)
    run_id = json.loads((tmp_path / "runs" / "outage" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(server.uri)
    # Every key of every report arrived, at its step and with its value (the run's own record).
    reports = [json.loads(line) for line in metrics.read_text().splitlines()]
    keys = {key for report in reports for key in report if key not in ("step", "time")}
    assert {"loss", "lr", "images_per_s", "val_top1", "val_loss"} <= keys
    for key in keys:
        expected = [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in reports if key in r]
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == expected, key
    assert [m.step for m in client.get_metric_history(run_id, "val_top1")] == [22, 44, 66]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_tracking_server_that_never_answers_ends_the_run_with_status_6_and_the_checkpoint_safe(
        digits_root: Path, tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"  # a port no server listens on
    process = train(*common(digits_root, tmp_path / "runs", nobody, "untracked"))
    output, _ = process.communicate(timeout=600)
    text = output.decode(errors="replace")
    assert process.returncode == 6, text[-4000:]
    assert f"tracking incomplete: {nobody} did not take the run's metrics and artifacts (the run was never created " \
           "there): the model was not registered; the checkpoint" in text
    summary = json.loads((tmp_path / "runs" / "untracked" / "summary.json").read_text())
    assert summary["tracking_error"].startswith(f"{nobody} did not take") and summary["model_uri"] is None
    assert open_checkpoints(str(tmp_path / "runs" / "untracked" / "checkpoints")).latest().step == 22  # type: ignore[union-attr]


def test_a_dead_server_keeps_the_newest_metrics_up_to_the_cap_and_counts_the_rest(tmp_path: Path) -> None:
    import inspect

    from configs import load_config
    from launch.tracking.sink import MlflowSink

    assert inspect.signature(MlflowSink).parameters["max_buffered"].default == 100_000
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens: every send fails
    sink = MlflowSink(load_config("quickstart", [f"tracking.uri={uri}"]), tmp_path, world_size=1, device="cpu",
                      max_buffered=10)
    for step in range(1, 26):
        sink.log({"loss": float(step)}, step)  # the cap applies as each is queued, whatever the sender does
    assert [metric.step for metric in sink.buffer] == list(range(16, 26))  # the newest 10 kept
    assert sink.dropped == 15  # counted, to be logged as tracking_dropped_metrics once a server answers
    assert not sink.close(timeout_s=0.5)


CREATE_STORE = """
import sys
sys.path.insert(0, {repo!r})
from launch.tracking.store import create_sqlite_store
import mlflow
print("imported", flush=True)
(create_sqlite_store if {atomic} else lambda uri: mlflow.MlflowClient(uri).search_experiments())({uri!r})
"""


def _kill_while_creating(database: Path, *, atomic: bool) -> None:
    """Start a process that creates the sqlite store `database` (with `create_sqlite_store`, or with plain
    MLflow when not `atomic`), and SIGKILL it once it has written part of the tables (the whole is 0.9 MB)."""
    code = CREATE_STORE.format(repo=str(REPO), atomic=atomic, uri=f"sqlite:///{database}")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    assert process.stdout is not None and process.stdout.readline() == "imported\n"
    deadline = time.monotonic() + 60
    while sum(_size(path) for path in database.parent.glob(f"{database.name}*")) < 200_000:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.kill()
    assert process.wait() == -9  # the fault happened: killed, not finished


def test_a_process_killed_while_creating_the_embedded_store_leaves_no_store_behind(tmp_path: Path) -> None:
    # Negative control: plain MLflow killed mid-creation leaves a half-built database at the store's path
    # (whether a later process can finish it depends on the migration step it died in).
    plain = tmp_path / "plain" / "mlflow.db"
    plain.parent.mkdir()
    _kill_while_creating(plain, atomic=False)
    assert plain.is_file()

    database = tmp_path / "runs" / "mlflow.db"
    database.parent.mkdir()
    _kill_while_creating(database, atomic=True)
    assert not database.exists()  # only the killed process's scratch file
    assert [path.name for path in database.parent.iterdir()][0].startswith("mlflow.db.tmp-")

    from launch.tracking.store import create_sqlite_store

    create_sqlite_store(f"sqlite:///{database}")
    assert _schema(plain) != _schema(database)
    client = mlflow.MlflowClient(f"sqlite:///{database}")
    experiment_id = client.create_experiment("after-the-kill")
    assert client.create_run(experiment_id).info.status == "RUNNING"


def _size(path: Path) -> int:
    """The size of a file that sqlite may be deleting (its journal) meanwhile, 0 if gone."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _schema(database: Path) -> tuple[set[str], list[tuple[str, ...]]]:
    """The tables of a sqlite store and the migration it is at."""
    import sqlite3

    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = connection.execute("SELECT * FROM alembic_version").fetchall() if "alembic_version" in tables else []
    return tables, version
