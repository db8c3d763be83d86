"""The Ray launcher on a real local Ray cluster with 2 CPU workers: a worker killed (SIGKILL) or stopped
(SIGTERM) mid-epoch is restarted and the run reaches the weights of an uninterrupted run, with every step in
the metrics once; a run out of restarts ends with an error naming its last good checkpoint, which a later
`--resume` continues to the same weights. An elastic job on two Ray nodes, streaming packed data and keeping
its checkpoints on a real S3 server, shrinks to one worker and grows back to the weights of an unresized run."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from configs import load_config
from tests.multiproc import free_port, run_ranks
from trainer.checkpoint import open_checkpoints
from trainer.serialize import from_bytes

# `make test` installs the ray extra: without it these tests must fail to import, not skip.
import ray  # noqa: F401, E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# 2 epochs of 22 steps of 2 x 32 images at 8 px; checkpoints every 5 steps and at each epoch's end.
COMMON = ["data.image_size=8", "data.batch_size=32",
          "data.dali_threads=1", "data.loader_workers=1", "distributed.strategy=ddp",
          "schedule.epochs=2", "checkpoint.interval_steps=5", "checkpoint.keep_last=2",
          "tracking.log_interval_steps=5", "tracking.register=false"]
TOTAL_STEPS = 44


def overrides(root: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [f"data.root={root}", *COMMON, f"launch.runs_dir={runs}", f"launch.name={name}", "launch.num_workers=2",
            *extra]


def final_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return final_weights_at(checkpoint_dir, TOTAL_STEPS)


def final_weights_at(checkpoints: Path | str, steps: int) -> dict[str, torch.Tensor]:
    manager = open_checkpoints(str(checkpoints), keep_last=1)
    manifest = manager.latest()
    assert manifest is not None and manifest.step == steps
    return from_bytes(manager.read(manifest.step, "model.pt"))


@pytest.fixture(scope="module")
def uninterrupted(digits_root: Path, module_tmp: Path) -> dict[str, torch.Tensor]:
    """The weights 2 gloo processes reach without any failure (the same loop, without Ray)."""
    folder = module_tmp / "uninterrupted"
    cfg = load_config("quickstart", [f"data.root={digits_root}", *COMMON, f"checkpoint.url={folder}"])
    run_ranks(cfg)
    return final_weights(folder)


def start_training(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`python -m launch train` in a new process (its own local Ray cluster, which inherits `env` on top of
    this environment), output to `log`."""
    with log.open("wb") as output:
        return subprocess.Popen([sys.executable, "-m", "launch", "train", *args], cwd=REPO, stdout=output,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def train_workers(driver: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The Ray Train worker processes of the run `driver` started (its local cluster's), oldest first: never
    another suite's on the same machine."""
    workers = [p for p in descendants(driver) if "ray::RayTrainWorker" in " ".join(p.cmdline())]
    assert workers, "the run has no Ray Train worker"
    return sorted(workers, key=lambda p: p.create_time())


def descendants(driver: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """Every process under `driver` (its local Ray cluster: GCS, raylet, agents, workers)."""
    found = []
    for process in psutil.Process(driver.pid).children(recursive=True):
        try:
            process.cmdline()
            found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_for_report(metrics: Path, *, after_step: int, timeout_s: float = 300) -> int:
    """Wait until metrics.jsonl holds a training report beyond `after_step`; return its step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics.is_file():
            steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
            if steps and steps[-1] > after_step:
                return int(steps[-1])
        time.sleep(0.2)
    raise TimeoutError(f"no training report after step {after_step} in {metrics}")


def finish(driver: subprocess.Popen[bytes], log: Path, timeout_s: float = 600) -> str:
    driver.wait(timeout=timeout_s)
    return log.read_text(errors="replace")


def assert_every_step_once(run_dir: Path) -> None:
    """Training reports every 5 steps and at each epoch's end, evaluations at each epoch's end, each once and
    in order: the lines an attempt wrote after its last checkpoint were dropped when the next one resumed."""
    reports = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports if "loss" in r] == [5, 10, 15, 20, 22, 25, 30, 35, 40, 44]
    assert [r["step"] for r in reports if "val_top1" in r] == [22, 44]


def test_killed_and_preempted_workers_are_restarted_and_reach_the_uninterrupted_weights(
        digits_root: Path, tmp_path: Path, uninterrupted: dict[str, torch.Tensor]) -> None:
    log = tmp_path / "faults.log"
    driver = start_training(overrides(digits_root, tmp_path, "faults", "launch.max_failures=4",
                                      "tracking.register=true"), log)
    metrics = tmp_path / "faults" / "metrics.jsonl"
    try:
        wait_for_report(metrics, after_step=5)
        killed = train_workers(driver)[-1].pid
        assert f"pid={killed}) world_rank=" in log.read_text(errors="replace")  # a worker of this run
        os.kill(killed, signal.SIGKILL)  # a lost process, mid-epoch
        sigterm_after = wait_for_report(metrics, after_step=15)
        stopped = train_workers(driver)[0].pid
        os.kill(stopped, signal.SIGTERM)  # a preemption, later in the run
        output = finish(driver, log)
    finally:
        driver.kill()
    assert driver.returncode == 0, output[-5000:]
    # The driver saw both failures, each of a process of this run, and each time started a new worker group.
    # After the kill it resumed from an interval checkpoint committed before it; after SIGTERM, from the
    # checkpoint every rank committed a step or two after the signal: no step completed before it was redone.
    assert sigterm_after > 15
    assert "Error count: 1 " in output and "Error count: 2 " in output and "Error count: 3 " not in output
    assert f"pid={stopped}) world_rank=" in output and f"pid: {killed}" in output
    resumed = [int(step) for step in re.findall(r"run faults: resnet18 on 2 x cpu, resuming from step (\d+)", output)]
    assert len(resumed) == 2 and 5 <= resumed[0] <= 15 and resumed[0] % 5 == 0, output[-5000:]
    assert sigterm_after <= resumed[1] < TOTAL_STEPS, output[-5000:]
    assert re.search(rf"stopped on SIGTERM at step {resumed[1]}, checkpoint committed \d+\.\d s after this "
                     r"process's SIGTERM \(within launch.preempt_grace_s=30\)", output), output[-5000:]
    weights = final_weights(tmp_path / "faults" / "checkpoints")
    for key, value in uninterrupted.items():
        assert torch.equal(weights[key], value), key
    assert_every_step_once(tmp_path / "faults")
    summary = json.loads((tmp_path / "faults" / "summary.json").read_text())
    assert summary["steps"] == TOTAL_STEPS and summary["world_size"] == 2
    assert output.count("val top-1") == 1  # the driver's summary; workers print none
    assert_registered_once(tmp_path, summary)



def test_a_stopped_worker_times_out_its_collective_and_the_group_restarts(
        digits_root: Path, tmp_path: Path) -> None:
    log = tmp_path / "hung.log"
    # One epoch (22 steps): exact resumes are shown above; this is about a hang becoming a restart.
    # Ray then waits for the group's process groups to shut down, which a stopped process never does: 30 s by
    # default, 5 here.
    driver = start_training(overrides(digits_root, tmp_path, "hung", "distributed.timeout_s=15", "schedule.epochs=1"),
                            log, env={"TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "5"})
    metrics = tmp_path / "hung" / "metrics.jsonl"
    stopped = None
    try:
        wait_for_report(metrics, after_step=5)
        stopped = train_workers(driver)[-1]
        assert f"pid={stopped.pid}) world_rank=" in log.read_text(errors="replace")  # a worker of this run
        stopped.send_signal(signal.SIGSTOP)  # alive but answering nothing, as a hung GPU or a frozen host
        time.sleep(1)
        assert stopped.status() == psutil.STATUS_STOPPED
        output = finish(driver, log)
    finally:
        if stopped is not None and stopped.is_running():
            stopped.send_signal(signal.SIGCONT)  # never leave a stopped process behind, whatever failed
        driver.kill()
    assert driver.returncode == 0, output[-5000:]
    # The other rank's collective gave up after distributed.timeout_s (gloo's message), the group failed once
    # and was replaced (the stopped process killed with it), and the new group finished the run.
    assert re.search(r"Timed out waiting 15000ms", output), output[-5000:]
    assert "Error count: 1 " in output and "Error count: 2 " not in output
    assert not psutil.pid_exists(stopped.pid) or stopped.status() == psutil.STATUS_ZOMBIE
    summary = json.loads((tmp_path / "hung" / "summary.json").read_text())
    assert (summary["steps"], summary["restarts"], summary["resizes"]) == (TOTAL_STEPS // 2, 1, 0)


def assert_registered_once(runs: Path, summary: dict[str, object]) -> None:
    """A run that ends again after it registered its model (as an attempt Ray restarts after registering
    does: the same run and final step) registers no second version."""
    from mlflow import MlflowClient

    again = subprocess.run([sys.executable, "-m", "launch", "train", "--resume", "faults", f"launch.runs_dir={runs}"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-3000:]
    assert "resuming from step 44" in again.stdout
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    versions = client.search_model_versions("name='resnet18-digits'")
    assert [(str(v.version), v.run_id, v.tags["step"]) for v in versions] == [("1", summary["mlflow_run_id"], "44")]
    assert json.loads((runs / "faults" / "summary.json").read_text())["model_uri"] == "models:/resnet18-digits/1"


def test_out_of_restarts_names_the_last_checkpoint_and_a_later_resume_finishes(
        digits_root: Path, tmp_path: Path, uninterrupted: dict[str, torch.Tensor]) -> None:
    log = tmp_path / "fragile.log"
    driver = start_training(overrides(digits_root, tmp_path, "fragile", "launch.max_failures=0"), log)
    try:
        wait_for_report(tmp_path / "fragile" / "metrics.jsonl", after_step=10)
        os.kill(train_workers(driver)[0].pid, signal.SIGKILL)
        output = finish(driver, log)
    finally:
        driver.kill()
    assert driver.returncode == 4, output[-5000:]
    checkpoints = open_checkpoints(str(tmp_path / "fragile" / "checkpoints"), keep_last=1)
    latest = checkpoints.latest()
    assert latest is not None and 10 <= latest.step < TOTAL_STEPS  # committed and intact
    assert (f"run fragile failed 1 times (launch.max_failures=0); the last good checkpoint is "
            f"{checkpoints.url(latest.step)} (step {latest.step}); continue it with "
            "`python -m launch train --resume fragile`") in output

    # Later, with the process tree gone: continue by name. That driver is killed (SIGKILL) after its next
    # checkpoint: nothing of the Ray cluster it started outlives it, and --resume continues the run again.
    command = [sys.executable, "-m", "launch", "train", "--resume", "fragile", f"launch.runs_dir={tmp_path}"]
    killed_log = tmp_path / "killed.log"
    killed = start_training(command[4:], killed_log)
    try:
        wait_until(lambda: (checkpoints.latest() or latest).step > latest.step, "a checkpoint after the resume",
                   killed)
        tree = descendants(killed)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "ray::DashboardAgent" in names and "raylet" in names and "ray::RayTrainWorker" in names, names
        killed.kill()
        assert killed.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 60
        while left := [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
            assert time.monotonic() < deadline, f"left behind by the killed driver: {[p.cmdline() for p in left]}"
            time.sleep(0.5)
    finally:
        killed.kill()
    assert f"resuming from step {latest.step}" in killed_log.read_text(errors="replace")
    again = checkpoints.latest()
    assert again is not None and latest.step < again.step < TOTAL_STEPS
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-5000:] + resumed.stderr[-3000:]
    assert f"resuming from step {again.step}" in resumed.stdout
    weights = final_weights(tmp_path / "fragile" / "checkpoints")
    for key, value in uninterrupted.items():
        assert torch.equal(weights[key], value), key
    assert_every_step_once(tmp_path / "fragile")


@pytest.mark.parametrize(("extra", "status", "message"), [
    (["model.num_classes=7"], 2, r"error: worker rank \d: model.num_classes=7 but the data set at data.root=.* has "
                                 r"10 classes"),
    (["optim.lr=1e30", "schedule.warmup_epochs=0", "optim.max_nonfinite_steps=3"], 3,
     r"training stopped: worker rank \d: \d+ consecutive steps before step \d+ had a non-finite loss"),
], ids=["config", "divergence"])
def test_an_error_no_restart_can_fix_stops_the_ray_run_at_once(digits_root: Path, tmp_path: Path, extra: list[str],
                                                               status: int, message: str) -> None:
    log = tmp_path / "fatal.log"
    driver = start_training(overrides(digits_root, tmp_path, "fatal", "launch.max_failures=5", *extra), log)
    try:
        output = finish(driver, log)
    finally:
        driver.kill()
    assert driver.returncode == status, output[-5000:]
    assert re.search(message, output), output[-5000:]
    # The fault happened in a worker, which recorded it; training started once, not once per allowed restart.
    record = json.loads((tmp_path / "fatal" / "fatal_error.json").read_text())
    assert re.search(message.split(": ", 2)[-1], record["message"]) and record["kind"] in ("user", "diverged")
    assert output.count("run fatal: resnet18 on 2 x cpu") == 1, output[-5000:]


# Elastic: 1 to 2 workers, a resize check every second, a group start given up after 10 s (then Ray starts with
# the workers it can get); 3 epochs, so that the lone worker cannot finish before the added node joins.
ELASTIC = ["launch.num_workers=[1, 2]", "launch.resize_interval_s=1", "launch.group_start_timeout_s=10",
           "launch.max_failures=4", "schedule.epochs=3"]
ELASTIC_STEPS = 66


def two_rank_weights(folder: Path, *extra: str) -> dict[str, torch.Tensor]:
    """The final weights of a 3-epoch run of 2 gloo processes that never stop (the same loop, without Ray)."""
    cfg = load_config("quickstart", [*COMMON, "schedule.epochs=3", f"checkpoint.url={folder}", *extra])
    run_ranks(cfg)
    return final_weights_at(folder, ELASTIC_STEPS)


STAGE_ENV = "RESNET_TEST_STAGE"
"""Each node's own staging folder (data.stage_dir=$RESNET_TEST_STAGE), set in its processes' environment."""


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """A Ray cluster of two node processes on this machine (Ray's own test utility, as `ray start --head` and
    `ray start --address` would make them), one CPU and its own staging folder (tmp_path/stage/<node>) each,
    with the jobs API on 127.0.0.1: the cluster and its second node."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "env_vars": {STAGE_ENV: str(tmp_path / "stage" / "head")}})
    try:
        second = cluster.add_node(num_cpus=1, env_vars={STAGE_ENV: str(tmp_path / "stage" / "second")})
        cluster.wait_for_nodes()
        yield cluster, second
    finally:
        cluster.shutdown()


def ray_job(dashboard: str, *args: str) -> list[str]:
    """`ray job submit` of `python -m launch train ARGS` with this checkout as the working directory, as
    README tells users (the interpreter named in full: the cluster's PATH need not hold this environment)."""
    return [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", dashboard, "--working-dir",
            str(REPO), "--", sys.executable, "-m", "launch", "train", *args]


class Never:
    """Stands in for "no checkpoint yet" in a comparison of steps."""

    step = -1


def wait_until(condition: Callable[[], bool], what: str, job: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if job.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen (job ended: {job.returncode})")
        time.sleep(0.2)


def streamed(url: str, stage_dir: str, limit_gb: float) -> list[str]:
    """The overrides that stream the packed data set at `url` through a shard cache of `limit_gb` in `stage_dir`."""
    return ["data.dataset=folder", f"data.root={url}", f"data.stage_dir={stage_dir}", f"data.cache_limit_gb={limit_gb}",
            "data.shuffle_block_shards=2"]


def test_an_elastic_job_streaming_from_s3_loses_a_node_and_regains_one_and_ends_with_the_uninterrupted_weights(
        digits_root: Path, tmp_path: Path, s3_bucket: str, two_nodes: tuple[Any, Any]) -> None:
    from mlflow import MlflowClient

    from data_pipeline.shards import pack_dataset
    from launch.orchestration.starts import read_starts

    # The digits packed into shards of 0.1 MB on the S3 server, streamed by each node through a cache of half
    # the training set; the checkpoints (and the writer lease) on the S3 server too.
    data = f"{s3_bucket}/digits"
    shards = pack_dataset(digits_root, data, shard_mb=0.1, log=lambda line: None)
    limit_gb = sum(shard.num_bytes for shard in shards["train"]) / 2 / 1e9
    checkpoint_url = f"{s3_bucket}/elastic/checkpoints"
    cluster, second = two_nodes
    dashboard = f"http://{cluster.webui_url}"
    runs = tmp_path / "runs"
    # Submitted as README's cluster commands are: relative outputs would go to Ray's temporary copy of the
    # working directory, so the job refuses them and says what to pass.
    refused = subprocess.run(ray_job(dashboard, f"data.root={digits_root}", *COMMON, *ELASTIC),
                             capture_output=True, text=True, timeout=300)
    assert "launch.runs_dir='runs' would write there" in refused.stdout + refused.stderr, refused.stdout[-3000:]

    log = tmp_path / "elastic.log"
    run_dir = runs / "elastic"
    checkpoints = open_checkpoints(checkpoint_url, keep_last=2)
    with log.open("wb") as output:
        job = subprocess.Popen(ray_job(dashboard, *overrides(digits_root, runs, "elastic", *ELASTIC),
                                       *streamed(data, f"${STAGE_ENV}", limit_gb), f"checkpoint.url={checkpoint_url}"),
                               stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: checkpoints.latest() is not None, "a committed checkpoint", job)
            cluster.remove_node(second)  # a lost node: its worker and everything else on it die
            wait_until(lambda: [s.world_size for s in read_starts(run_dir)][-1:] == [1], "a restart with 1 worker",
                       job)
            # The lone worker commits a checkpoint of its own (its reports, the resize among them, reached the
            # tracking server by then), then a node joins: the group grows back at its next resize check.
            shrunk_at = read_starts(run_dir)[-1].step
            wait_until(lambda: (checkpoints.latest() or Never).step > shrunk_at, "a checkpoint of the lone worker",
                       job)
            cluster.add_node(num_cpus=1, env_vars={STAGE_ENV: str(tmp_path / "stage" / "third")})
            job.wait(timeout=600)
        finally:
            job.kill()
    text = log.read_text(errors="replace")
    assert job.returncode == 0, text[-5000:]

    starts = read_starts(run_dir)
    assert [s.world_size for s in starts] == [2, 1, 2], text[-5000:]
    assert starts[1].cause is not None and starts[1].cause.startswith("shrank")
    assert starts[2].cause == "grew: more workers could be had"
    assert "resize: 2 -> 1 workers at step" in text and "resize: 1 -> 2 workers at step" in text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"], summary["restarts"], summary["resizes"]) == (ELASTIC_STEPS, 2, 2,
                                                                                                 2)
    assert summary["steps_redone"] == sum(s.redone for s in starts)
    reports = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports if "val_top1" in r] == [22, 44, 66]  # each once, as assert_every_step_once
    assert [r["step"] for r in reports if "loss" in r] == [5, 10, 15, 20, 22, 25, 30, 35, 40, 44, 45, 50, 55, 60, 65,
                                                           66]
    resizes = [(r["step"], r["world_size"], r["previous_world_size"])
               for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "world_size" in r]
    assert resizes == [(starts[1].step, 1, 2), (starts[2].step, 2, 1)]
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    history = client.get_metric_history(summary["mlflow_run_id"], "world_size")
    assert sorted((m.step, m.value) for m in history) == [(starts[1].step, 1.0), (starts[2].step, 2.0)]
    # Each node streamed through its own cache, which held at most half the set (plus the shards in flight).
    largest = max(shard.num_bytes for shard in shards["train"])
    for node in ("head", "second", "third"):
        cached = [path.stat().st_size for path in (tmp_path / "stage" / node).glob("*/shards/*.tar")]
        assert cached and sum(cached) <= limit_gb * 1e9 + 4 * largest, node
    # The outputs are where the job was told to write them, not in Ray's copy of the working directory (in this
    # cluster's own session folder, which holds that copy).
    copies = list(Path(cluster.head_node.get_session_dir_path()).glob("runtime_resources/working_dir_files/*"))
    assert any((copy / "launch").is_dir() for copy in copies), copies  # the job's copy is there to look in
    assert not any((copy / "runs").exists() for copy in copies), copies

    # Same global batch at every size (1 worker accumulated 2 micro-batches of 32): the same weights, bit for
    # bit, as 2 workers that never stopped. (BatchNorm's running statistics differ: a lone worker updates
    # them with both micro-batches, DDP keeps rank 0's; training never reads them.)
    weights = final_weights_at(checkpoint_url, ELASTIC_STEPS)
    reference = two_rank_weights(tmp_path / "reference", *streamed(data, str(tmp_path / "stage" / "reference"),
                                                                   limit_gb))
    parameters = [key for key in reference if "running" not in key and "num_batches" not in key]
    for key in parameters:
        assert torch.equal(weights[key], reference[key]), key
    # Negative control, differing only in how each step's 64 images are split (2 ranks x 2 micro-batches of 16
    # instead of 2 x 32; the same images, steps and learning rates): the weights differ, so the equality above
    # is no accident of the comparison.
    split = two_rank_weights(tmp_path / "split", *streamed(data, str(tmp_path / "stage" / "split"), limit_gb),
                             "data.batch_size=16", "optim.accumulation_steps=2")
    assert not all(torch.equal(split[key], reference[key]) for key in parameters)
