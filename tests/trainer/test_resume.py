"""Exact resume: a run interrupted mid-epoch and restarted ends with the same weights, bit for bit."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

import data_pipeline.sharding
import trainer
import trainer.checkpoint
import trainer.state
from configs import IncompatibleSettings, RunConfig, load_config
from tests.multiproc import CrashAt, Interrupt
from data_pipeline.storage import FsspecStorage
from trainer.checkpoint import CheckpointCorrupt, CheckpointUnreadable, FileRecord, open_checkpoints, step_folder
from trainer.dist import single_process_context
from trainer.state import cuda_state_for, from_bytes, load_state


def config(root: Path, checkpoint_dir: Path | str, *extra: str) -> RunConfig:
    # 22 steps per epoch, 2 epochs; checkpoints every 14 steps (14, 28) and at each epoch end (22, 44).
    return load_config("quickstart", [
        f"data.root={root}", "data.dataset=folder", "data.image_size=8", "data.batch_size=64",
        "data.dali_threads=1", "data.loader_workers=0", "schedule.epochs=2", "tracking.log_interval_steps=10",
        f"checkpoint.url={checkpoint_dir}", "checkpoint.interval_steps=14", "checkpoint.keep_last=20", *extra,
    ])


def final_state(checkpoint_dir: Path) -> tuple[int, dict[str, torch.Tensor], dict]:
    manager = open_checkpoints(str(checkpoint_dir), keep_last=1)
    manifest = manager.latest()
    assert manifest is not None
    return (manifest.step, from_bytes(manager.read(manifest.step, "model.pt")),
            from_bytes(manager.read(manifest.step, "train_state.pt")))


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(digits_root: Path, module_tmp: Path) -> tuple[int, dict, dict]:
    checkpoint_dir = module_tmp / "uninterrupted"
    result = trainer.run(config(digits_root, checkpoint_dir), single_process_context(), [])
    assert result.steps == 44 and result.start_step == 0
    return final_state(checkpoint_dir)


def interrupted_then_resumed(root: Path, checkpoint_dir: Path) -> trainer.TrainResult:
    with pytest.raises(Interrupt):
        trainer.run(config(root, checkpoint_dir), single_process_context(), [CrashAt(30)])
    manifest = open_checkpoints(str(checkpoint_dir), keep_last=1).latest()
    assert manifest is not None and manifest.step == 28  # mid-epoch: epoch 1, batch 6
    return trainer.run(config(root, checkpoint_dir), single_process_context(), [])


def test_resume_mid_epoch_gives_bitwise_identical_weights(digits_root: Path, tmp_path: Path,
                                                          uninterrupted: tuple[int, dict, dict]) -> None:
    result = interrupted_then_resumed(digits_root, tmp_path)
    assert result.start_step == 28 and result.steps == 44
    assert result.train_images == (44 - 28) * 64
    step, model, train_state = final_state(tmp_path)
    assert step == uninterrupted[0] == 44
    assert_same_state(model, uninterrupted[1])
    momentum = [s["momentum_buffer"] for s in train_state["optimizer"]["state"].values()]
    expected = [s["momentum_buffer"] for s in uninterrupted[2]["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, expected, strict=True))


def test_negative_control_without_optimizer_state_the_weights_differ(
        digits_root: Path, tmp_path: Path, uninterrupted: tuple[int, dict, dict],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def load_without_optimizer(manager, manifest, strategy, ema, ctx, **kwargs):  # noqa: ANN001, ANN003, ANN202
        fresh = strategy.optimizer.state_dict()  # nothing in it yet: no momentum
        load_state(manager, manifest, strategy, ema, ctx, **kwargs)
        strategy.optimizer.load_state_dict(fresh)

    monkeypatch.setattr(trainer.state, "load_state", load_without_optimizer)
    interrupted_then_resumed(digits_root, tmp_path)
    assert not torch.equal(final_state(tmp_path)[1]["fc.weight"], uninterrupted[1]["fc.weight"])


def test_negative_control_with_other_augmentation_after_resume_the_weights_differ(
        digits_root: Path, tmp_path: Path, uninterrupted: tuple[int, dict, dict],
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(Interrupt):
        trainer.run(config(digits_root, tmp_path), single_process_context(), [CrashAt(30)])
    original = data_pipeline.sharding.sample_seed
    monkeypatch.setattr(data_pipeline.sharding, "sample_seed",
                        lambda seed, epoch, index, *copy: original(seed + 1, epoch, index, *copy))
    trainer.run(config(digits_root, tmp_path), single_process_context(), [])
    assert not torch.equal(final_state(tmp_path)[1]["fc.weight"], uninterrupted[1]["fc.weight"])


@pytest.fixture(scope="module")
def finished(digits_root: Path, module_tmp: Path) -> tuple[Path, trainer.TrainResult]:
    """A one-epoch run that completed; the tests below only read its checkpoints."""
    checkpoint_dir = module_tmp / "finished"
    return checkpoint_dir, trainer.run(config(digits_root, checkpoint_dir, "schedule.epochs=1"),
                                       single_process_context(), [])


def test_a_finished_run_resumes_to_its_result(digits_root: Path, finished: tuple[Path, trainer.TrainResult]) -> None:
    checkpoint_dir, first = finished
    again = trainer.run(config(digits_root, checkpoint_dir, "schedule.epochs=1"), single_process_context(), [])
    assert again.start_step == again.steps == first.steps == 22
    assert again.train_images == 0 and again.val == first.val


def test_checkpoint_of_another_architecture_is_refused(digits_root: Path,
                                                       finished: tuple[Path, trainer.TrainResult]) -> None:
    with pytest.raises(IncompatibleSettings, match=r"holds \{'name': 'resnet18', 'num_classes': 10.*this run builds "
                                          r"\{'name': 'resnet34'"):
        trainer.run(config(digits_root, finished[0], "model.name=resnet34"), single_process_context(), [])


def test_checkpoint_of_another_global_batch_is_refused(digits_root: Path,
                                                       finished: tuple[Path, trainer.TrainResult]) -> None:
    with pytest.raises(IncompatibleSettings, match=r"global batch of 64 images, this run uses 32"):
        trainer.run(config(digits_root, finished[0], "data.batch_size=32"), single_process_context(), [])


def test_checkpoint_holds_a_torchvision_compatible_model_and_the_resolved_config(
        finished: tuple[Path, trainer.TrainResult]) -> None:
    manager = open_checkpoints(str(finished[0]), keep_last=1)
    manifest = manager.latest()
    assert manifest is not None and manifest.step == 22 and manifest.meta["epoch"] == 1.0
    assert manifest.meta["val_top1"] == finished[1].val["val_top1"]
    assert manifest.meta["config"]["model"]["name"] == "resnet18"
    assert set(manifest.files) == {"model.pt", "train_state.pt", "rank_0.pt"}
    weights = from_bytes(manager.read(22, "model.pt"))
    reference = torchvision.models.resnet18(num_classes=10)
    reference.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)  # the small-input stem
    reference.load_state_dict(weights, strict=True)


class DrawAtReports:
    """Stands in for code that draws from the global generators during training (dropout, a user's sampler):
    it draws from torch, numpy and python at every training report."""

    def __init__(self) -> None:
        self.draws: dict[int, tuple[float, float, float]] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        import random

        import numpy as np

        if "loss" in metrics:
            self.draws[step] = (torch.rand(()).item(), float(np.random.rand()), random.random())

    def on_checkpoint(self, step: int, url: str) -> None:
        pass


@pytest.mark.parametrize("restore", [True, False], ids=["restored", "negative-control-not-restored"])
def test_every_generator_continues_where_the_checkpoint_left_it(digits_root: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                restore: bool) -> None:
    # This trainer itself draws from no global generator (augmentation is seeded per sample, the loader's
    # worker seeds come from a private generator), so the
    # generator states matter only to other code; they must still continue exactly.
    whole = DrawAtReports()
    trainer.run(config(digits_root, tmp_path / "whole"), single_process_context(), [whole])
    if not restore:
        monkeypatch.setattr(trainer.state, "restore_rng", lambda state, device, source: None)
    with pytest.raises(Interrupt):
        trainer.run(config(digits_root, tmp_path / "resumed"), single_process_context(), [DrawAtReports(),
                                                                                          CrashAt(30)])
    resumed = DrawAtReports()
    trainer.run(config(digits_root, tmp_path / "resumed"), single_process_context(), [resumed])
    after_resume = {step: draws for step, draws in whole.draws.items() if step > 28}
    assert set(resumed.draws) == set(after_resume) == {30, 40, 42, 44}
    assert (resumed.draws == after_resume) is restore


def test_a_gpu_generator_state_goes_back_to_the_ranks_own_device_whatever_the_process_sees() -> None:
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    # Saved now: the rank's own GPU only, so a process that sees 4 GPUs (2 x 4 instead of 8 per node) takes it.
    assert cuda_state_for(states[6], torch.device("cuda", 2), source="rank_6.pt") is states[6]
    assert cuda_state_for(None, torch.device("cuda", 2), source="rank_6.pt") is None  # written on a CPU
    # Saved by earlier versions: every visible GPU's state; the device's own is taken when it is there.
    assert cuda_state_for(states, torch.device("cuda", 5), source="rank_5.pt") is states[5]
    with pytest.raises(IncompatibleSettings, match=r"rank_5.pt holds the CUDA generator states of 4 GPUs, and this "
                                                   r"rank trains on cuda:5"):
        cuda_state_for(states[:4], torch.device("cuda", 5), source="rank_5.pt")
    with pytest.raises(IncompatibleSettings, match=r"rank_0.pt holds the CUDA generator state of a rank that "
                                                   r"trained on a GPU, and this rank trains on cpu"):
        cuda_state_for(states[0], torch.device("cpu"), source="rank_0.pt")
    assert cuda_state_for([], torch.device("cpu"), source="rank_0.pt") is None


def damaged_copy(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    assert [m.step for m in open_checkpoints(str(copy)).committed()] == [14, 22]
    return copy


def recommit(folder: Path, name: str, data: bytes) -> None:
    """Replace a committed file and its manifest record, as a writer with access to both could."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    record = FileRecord.of(data)
    manifest["files"][name] = {"size": record.size, "sha256": record.sha256}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["none (negative control)", "flipped bytes", "unsafe pickle"])
def test_a_damaged_newest_step_is_reported_and_the_one_before_it_resumes(
        digits_root: Path, finished: tuple[Path, trainer.TrainResult], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], damage: str) -> None:
    copy = damaged_copy(finished[0], tmp_path)
    newest = copy / step_folder(22) / "model.pt"
    if damage == "flipped bytes":
        data = bytearray(newest.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])  # same size
        newest.write_bytes(bytes(data))
    elif damage == "unsafe pickle":
        buffer = io.BytesIO()
        torch.save({"conv1.weight": os.system}, buffer)  # a reference to code: weights-only loading refuses it
        recommit(copy / step_folder(22), "model.pt", buffer.getvalue())
    result = trainer.run(config(digits_root, copy, "schedule.epochs=1"), single_process_context(), [])
    out = capsys.readouterr().out
    if damage.startswith("none"):
        assert result.start_step == 22 and "is not used" not in out
        return
    reason = "its content does not match the SHA-256" if damage == "flipped bytes" else "does not load as weights only"
    assert f"checkpoint {copy / step_folder(22)} is not used: {newest}: {reason}" in out
    assert result.start_step == 14 and result.steps == 22
    # The damaged step was kept aside, and the run wrote step 22 anew.
    assert len(list(copy.glob(f"{step_folder(22)}.damaged-*/model.pt"))) == 1
    assert [m.step for m in open_checkpoints(str(copy)).committed()] == [14, 22]


def test_on_s3_a_damaged_newest_step_is_kept_aside_and_the_one_before_it_resumes(
        digits_root: Path, finished: tuple[Path, trainer.TrainResult], tmp_path: Path, s3_bucket: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    import s3fs

    copy = damaged_copy(finished[0], tmp_path)
    newest = copy / step_folder(22) / "model.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    url = f"{s3_bucket}/checkpoints"
    s3fs.S3FileSystem().put(str(copy), url, recursive=True)  # a real S3 server: no rename, moves are copies
    result = trainer.run(config(digits_root, url, "schedule.epochs=1"), single_process_context(), [])
    assert result.start_step == 14 and result.steps == 22
    assert f"checkpoint {url}/{step_folder(22)} is not used" in capsys.readouterr().out
    assert [m.step for m in open_checkpoints(url).committed()] == [14, 22]
    assert len(s3fs.S3FileSystem().glob(f"{url}/{step_folder(22)}.damaged-*/model.pt")) == 1


def test_when_no_committed_step_loads_the_run_stops_and_names_them(
        digits_root: Path, finished: tuple[Path, trainer.TrainResult], tmp_path: Path) -> None:
    copy = damaged_copy(finished[0], tmp_path)
    for step in (14, 22):
        recommit(copy / step_folder(step), "train_state.pt", b"not a checkpoint")
    with pytest.raises(CheckpointCorrupt, match=r"no committed checkpoint under .* loads: .*step_000000022/"
                                                r"train_state.pt.*step_000000014/train_state.pt"):
        trainer.run(config(digits_root, copy, "schedule.epochs=1"), single_process_context(), [])
    # Nothing was deleted or overwritten: both steps are kept aside for a person to look at.
    assert open_checkpoints(str(copy)).committed() == []
    assert len(list(copy.glob("step_*.damaged-*/train_state.pt"))) == 2


@pytest.mark.parametrize("failing_reads", [2, "all"])
def test_a_storage_error_is_retried_and_never_taken_for_damage(
        digits_root: Path, finished: tuple[Path, trainer.TrainResult], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], failing_reads: int | str) -> None:
    """A storage that fails reads of the newest step's files (an S3 or NFS outage): a passing error resumes
    from that step; one that lasts ends the start with the storage error, and every step stays where it was."""
    copy = damaged_copy(finished[0], tmp_path)
    monkeypatch.setattr(trainer.checkpoint, "READ_RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    failed: list[str] = []
    read_bytes = FsspecStorage.read_bytes

    def flaky(storage: FsspecStorage, path: str) -> bytes:
        if path.startswith(step_folder(22)) and not path.endswith("manifest.json") and (
                failing_reads == "all" or len(failed) < failing_reads):
            failed.append(path)
            raise ConnectionResetError(104, "Connection reset by peer")
        return read_bytes(storage, path)

    monkeypatch.setattr(FsspecStorage, "read_bytes", flaky)
    cfg = config(digits_root, copy, "schedule.epochs=1")
    if failing_reads == "all":
        with pytest.raises(CheckpointUnreadable, match=rf"{copy / step_folder(22)}/\w+\.pt: the storage failed 4 "
                                                       r"reads in a row \(ConnectionResetError"):
            trainer.run(cfg, single_process_context(), [])
        assert len(failed) == 4  # the fault happened, and was retried
    else:
        result = trainer.run(cfg, single_process_context(), [])
        assert len(failed) == 2 and "reading again in 0 s" in capsys.readouterr().out
        assert result.start_step == 22
    # Nothing was taken for damage: no step moved aside, both still committed.
    assert list(copy.glob("*.damaged-*")) == []
    assert [m.step for m in open_checkpoints(str(copy)).committed()] == [14, 22]


# Epoch 0 at 8 px, epoch 1 at 12: the crash (step 30) and the resume (from step 28) fall after the change.
# Mixup, CutMix, RandAugment and random erasing are on as well.
PROGRESSIVE = ["data.image_size=12", "data.progressive_start_size=8", "data.progressive_end_epoch=1",
               "data.progressive_multiple=4", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
               "data.auto_augment=rand", "data.random_erasing_prob=0.5"]


def test_resume_mid_epoch_after_a_progressive_size_change_and_with_mixing_and_augmentation_is_exact(
        digits_root: Path, tmp_path: Path) -> None:
    trainer.run(config(digits_root, tmp_path / "whole", *PROGRESSIVE), single_process_context(), [])
    with pytest.raises(Interrupt):
        trainer.run(config(digits_root, tmp_path / "resumed", *PROGRESSIVE), single_process_context(), [CrashAt(30)])
    # The negative controls below resume copies of the crashed run's checkpoints with one setting changed.
    for control in ("other", "unmixed"):
        shutil.copytree(tmp_path / "resumed", tmp_path / control)
    result = trainer.run(config(digits_root, tmp_path / "resumed", *PROGRESSIVE), single_process_context(), [])
    assert result.start_step == 28 and result.steps == 44
    assert_same_state(final_state(tmp_path / "resumed")[1], final_state(tmp_path / "whole")[1])
    # Negative control: resumed with a schedule that keeps epoch 1 at 8 px, the weights differ.
    slower = [*PROGRESSIVE, "data.progressive_end_epoch=5"]
    assert config(digits_root, tmp_path, *slower).data.crop_size(train=True, epoch=1) == 8
    trainer.run(config(digits_root, tmp_path / "other", *slower), single_process_context(), [])
    other, whole = final_state(tmp_path / "other")[1], final_state(tmp_path / "whole")[1]
    assert not torch.equal(other["fc.weight"], whole["fc.weight"])
    # Negative control: resumed without mixing, the weights differ too (mixing was on, and it is seeded).
    trainer.run(config(digits_root, tmp_path / "unmixed", *PROGRESSIVE, "data.mixup_alpha=0", "data.cutmix_alpha=0"),
                single_process_context(), [])
    assert not torch.equal(final_state(tmp_path / "unmixed")[1]["fc.weight"], whole["fc.weight"])
