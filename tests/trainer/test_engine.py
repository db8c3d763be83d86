"""The single-process engine on real data: exact evaluation, step accounting, reports and config errors."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import trainer
from configs import IncompatibleSettings, load_config
from configs.schema import DataConfig, PrecisionConfig
from data_pipeline import build_loaders
from trainer.checkpoint import open_checkpoints
from trainer.dist import single_process_context
from trainer.evaluate import evaluate
from trainer import TrainingDiverged
from trainer.models import resnet18
from trainer.precision import resolve_precision
from trainer.serialize import from_bytes


class RecordingSink:
    """Keeps every report, for assertions."""

    def __init__(self) -> None:
        self.reports: list[tuple[int, dict[str, float]]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.reports.append((step, metrics))

    def on_checkpoint(self, step: int, url: str) -> None:
        pass


def val_loader(root: Path, batch_size: int):  # noqa: ANN201
    cfg = DataConfig(root=str(root), batch_size=batch_size, dali_threads=1, loader_workers=0, image_size=32)
    return build_loaders(cfg, seed=0).val


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = resnet18(num_classes=10, small_input=True, zero_init_residual=False)
    # A few train-mode passes give the BatchNorm layers non-trivial statistics.
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    return model.eval()


def test_evaluation_counts_every_image_once_whatever_the_batch_size(digits_root: Path,
                                                                    model: torch.nn.Module) -> None:
    precision = resolve_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    results = [evaluate(model, val_loader(digits_root, bs), precision, channels_last=False) for bs in (7, 100, 355)]
    assert all(r["val_images"] == 355 for r in results)
    assert results[0]["val_top1"] == results[1]["val_top1"] == results[2]["val_top1"]
    assert results[0]["val_top5"] == results[1]["val_top5"] == results[2]["val_top5"]
    assert results[0]["val_loss"] == pytest.approx(results[2]["val_loss"], rel=1e-5)

    # Against a direct computation over the whole split in one tensor.
    images, labels = next(val_loader(digits_root, 355).iter_epoch(0))
    with torch.no_grad():
        logits = model(images)
    assert results[0]["val_top1"] == (logits.argmax(1) == labels).sum().item() / 355
    assert results[0]["val_top5"] == (logits.topk(5).indices == labels[:, None]).any(1).sum().item() / 355


def test_flip_averaging_scores_the_mean_logits_of_each_image_and_its_mirror_image(digits_root: Path,
                                                                                  model: torch.nn.Module) -> None:
    precision = resolve_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    averaged = evaluate(model, val_loader(digits_root, 100), precision, channels_last=True, flip_average=True)
    images, labels = next(val_loader(digits_root, 355).iter_epoch(0))
    with torch.no_grad():
        logits = (model(images) + model(images.flip(3))) / 2
    assert averaged["val_images"] == 355
    assert averaged["val_top1"] == (logits.argmax(1) == labels).sum().item() / 355
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert averaged["val_loss"] == pytest.approx(expected_loss, rel=1e-5)
    # Negative control: without it, the mirror images are not counted (the gap is small for this untrained
    # model, but 30 times the tolerance).
    plain = evaluate(model, val_loader(digits_root, 100), precision, channels_last=True)
    with torch.no_grad():
        plain_loss = torch.nn.functional.cross_entropy(model(images), labels).item()
    assert plain["val_loss"] == pytest.approx(plain_loss, rel=1e-5)
    assert plain["val_loss"] != pytest.approx(expected_loss, rel=1e-5)


def quick_overrides(root: Path, runs: Path) -> list[str]:
    return [f"data.root={root}", "data.dataset=folder", "data.image_size=16", "data.batch_size=64",

            "data.dali_threads=1", "data.loader_workers=0",
            "schedule.epochs=1", "schedule.warmup_epochs=0.2", "optim.lr=0.05",
            "tracking.log_interval_steps=10", f"launch.runs_dir={runs}"]


def test_one_epoch_reports_progress_and_evaluates(digits_root: Path, tmp_path: Path) -> None:
    cfg = load_config("quickstart", quick_overrides(digits_root, tmp_path))
    sink = RecordingSink()
    result = trainer.run(cfg, single_process_context(), [sink])

    assert result.steps == 1442 // 64 == 22
    assert result.train_images == 22 * 64 and result.images_per_s > 0
    train_reports = [(step, m) for step, m in sink.reports if "loss" in m]
    assert [step for step, _ in train_reports] == [10, 20, 22]
    assert all({"loss", "lr", "images_per_s", "eta_s", "epoch"} <= set(m) for _, m in train_reports)
    assert train_reports[-1][1]["eta_s"] == 0 and train_reports[-1][1]["epoch"] == 1.0
    assert [m["progress"] for _, m in train_reports] == [10 / 22, 20 / 22, 1.0]
    # Decoding on one DALI thread keeps the step waiting for data part of the time.
    assert all(0 < m["data_wait_share"] < 1 for _, m in train_reports)
    step, val = sink.reports[-1]
    reached = {key: val.pop(key) for key in list(val) if key.startswith(("time_to_top1_", "device_hours_to_top1_"))}
    assert step == 22 and val == {"epoch": 1, **result.val} and result.val["val_images"] == 355
    assert len(reached) == 2 * len(result.time_to_accuracy)  # the levels of tracking.top1_thresholds it reached
    # One epoch at 16 px learns something; chance is 10%.
    assert result.val["val_top1"] > 0.15


def test_num_classes_must_match_the_data(digits_root: Path, tmp_path: Path) -> None:
    cfg = load_config("quickstart", [*quick_overrides(digits_root, tmp_path), "model.num_classes=1000"])
    with pytest.raises(IncompatibleSettings,
                       match=r"model.num_classes=1000 but the data set at data.root=.* has 10 classes"):
        trainer.run(cfg, single_process_context(), [])


def test_a_batch_larger_than_the_training_set_is_an_error(digits_root: Path, tmp_path: Path) -> None:
    cfg = load_config("quickstart", [*quick_overrides(digits_root, tmp_path), "data.batch_size=5000"])
    with pytest.raises(IncompatibleSettings, match=r"data.batch_size=5000 x 1 workers x 1 accumulated micro-batches "
                                                   r"is larger than the training set \(1442 images\)"):
        trainer.run(cfg, single_process_context(), [])


def poison_the_first_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first training sample ever decoded turns into NaNs: exactly one step sees a NaN loss."""
    import data_pipeline.torch_loader as torch_loader

    first_index = {}
    original = torch_loader.ImageDataset.__getitem__

    def poisoned(self, key):  # noqa: ANN001, ANN202
        image, label = original(self, key)
        if self.train and not first_index and image.shape[0] == 16:
            first_index["key"] = key
        return (image * float("nan"), label) if first_index.get("key") == key else (image, label)

    monkeypatch.setattr(torch_loader.ImageDataset, "__getitem__", poisoned)


def test_a_non_finite_step_is_skipped_and_counted(digits_root: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    poison_the_first_sample(monkeypatch)
    sink = RecordingSink()
    cfg = load_config("quickstart", [*quick_overrides(digits_root, tmp_path), "data.loader=torch"])
    result = trainer.run(cfg, single_process_context(), [sink])
    skipped = [m["nonfinite_losses"] for _, m in sink.reports if "loss" in m]
    assert skipped == [1.0, 0.0, 0.0]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for _, m in sink.reports if "loss" in m)
    assert result.val["val_top1"] > 0.1


def test_a_run_of_non_finite_steps_stops_training(digits_root: Path, tmp_path: Path) -> None:
    cfg = load_config("quickstart", [*quick_overrides(digits_root, tmp_path), "optim.lr=1e30",
                                     "schedule.warmup_epochs=0", "optim.max_nonfinite_steps=3"])
    with pytest.raises(TrainingDiverged, match=r"consecutive steps before step 10 had a non-finite loss"):
        trainer.run(cfg, single_process_context(), [])


def test_sync_batchnorm_is_refused_on_a_cpu(digits_root: Path, tmp_path: Path) -> None:
    cfg = load_config("quickstart", [*quick_overrides(digits_root, tmp_path), "distributed.sync_batchnorm=true"])
    with pytest.raises(IncompatibleSettings, match="sync_batchnorm=true needs GPUs"):
        trainer.run(cfg, single_process_context(), [])


@pytest.mark.slow
def test_a_compiled_model_trains_and_saves_torchvision_names(digits_root: Path, tmp_path: Path) -> None:
    from trainer.checkpoint import open_checkpoints
    from trainer.state import from_bytes

    cfg = load_config("quickstart", [*quick_overrides(digits_root, tmp_path), "precision.compile=true",
                                     f"checkpoint.url={tmp_path / 'checkpoints'}"])
    result = trainer.run(cfg, single_process_context(), [])
    assert result.val["val_top1"] > 0.15  # learns like the eager model (chance is 10%)
    manager = open_checkpoints(str(tmp_path / "checkpoints"), keep_last=1)
    weights = from_bytes(manager.read(22, "model.pt"))
    assert "conv1.weight" in weights and not any(key.startswith("_orig_mod") for key in weights)


@pytest.mark.parametrize("rolled_back", [True, False], ids=["ema-rolled-back", "negative-control-model-only"])
def test_a_non_finite_step_leaves_the_weight_average_finite(digits_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, rolled_back: bool) -> None:
    import trainer.loop

    poison_the_first_sample(monkeypatch)
    if not rolled_back:  # what the meter did before: roll back only the model's BatchNorm statistics
        monkeypatch.setattr(trainer.loop.Learner, "running_stats", lambda self: [
            b for b in self.strategy.unwrapped().buffers() if b.is_floating_point()])
    sink = RecordingSink()
    cfg = load_config("quickstart", [*quick_overrides(digits_root, tmp_path), "data.loader=torch",
                                     "optim.ema_decay=0.9"])
    result = trainer.run(cfg, single_process_context(), [sink])
    assert [m["nonfinite_losses"] for _, m in sink.reports if "loss" in m][0] == 1.0  # the fault happened
    assert math.isfinite(result.val["val_loss"])
    assert math.isfinite(result.val["ema_val_loss"]) is rolled_back


def test_a_run_ends_at_its_target_accuracy_and_records_when_it_reached_each_level(digits_root: Path,
                                                                                  tmp_path: Path) -> None:
    overrides = [*quick_overrides(digits_root, tmp_path), "schedule.epochs=5", f"checkpoint.url={tmp_path / 'ckpt'}",
                 "tracking.top1_thresholds=[0.15,0.999]"]
    cfg = load_config("quickstart", [*overrides, "schedule.target_top1=0.3"])
    sink = RecordingSink()
    result = trainer.run(cfg, single_process_context(), [sink])
    evaluations = [(step, m) for step, m in sink.reports if "val_top1" in m]
    # It stopped at the first evaluation that reached 30%, before the schedule's end, with its checkpoint.
    assert result.stopped_at_target and result.steps == 22 * len(evaluations) < 5 * 22
    assert [m["val_top1"] >= 0.3 for _, m in evaluations] == [False] * (len(evaluations) - 1) + [True]
    latest = open_checkpoints(str(tmp_path / "ckpt")).latest()
    assert latest is not None and latest.step == result.steps
    # Each level once, at the first evaluation reaching it; the target is always one; 99.9% never came.
    assert set(result.time_to_accuracy) == {"0.15", "0.3"}
    for level, at in result.time_to_accuracy.items():
        first = next(step for step, m in evaluations if m["val_top1"] >= float(level))
        assert at["step"] == first and at["epoch"] == first // 22 and 0 < at["elapsed_s"]
        assert at["device_hours"] == pytest.approx(at["elapsed_s"] / 3600)  # one process
        name = f"{100 * float(level):g}"
        assert [step for step, m in evaluations if f"time_to_top1_{name}_s" in m] == [first]
    assert latest.meta["time_to_accuracy"]["reached"] == result.time_to_accuracy

    # Resumed after it ended at its target: nothing left to do.
    again = trainer.run(cfg, single_process_context(), [])
    assert (again.steps, again.train_images, again.stopped_at_target) == (result.steps, 0, True)
    assert again.time_to_accuracy == result.time_to_accuracy
    # Negative control: without the target it trains on (one more epoch here), and the run's clock goes on
    # from the checkpoint's, keeping the levels it had reached.
    extended = load_config("quickstart", [*overrides[:-3], f"schedule.epochs={result.steps // 22 + 1}",
                                          *overrides[-2:]])
    more = trainer.run(extended, single_process_context(), [])
    assert more.steps == result.steps + 22 and not more.stopped_at_target
    assert {k: v for k, v in more.time_to_accuracy.items() if k in result.time_to_accuracy} == result.time_to_accuracy
    final = open_checkpoints(str(tmp_path / "ckpt")).latest()
    assert final is not None
    assert final.meta["time_to_accuracy"]["elapsed_s"] > latest.meta["time_to_accuracy"]["elapsed_s"]


def test_a_run_trained_at_one_size_is_evaluated_at_another(digits_root: Path, tmp_path: Path) -> None:
    cfg = load_config("quickstart", [*quick_overrides(digits_root, tmp_path), "data.val_image_size=24",
                                     f"checkpoint.url={tmp_path / 'ckpt'}"])
    result = trainer.run(cfg, single_process_context(), [])
    manager = open_checkpoints(str(tmp_path / "ckpt"))
    latest = manager.latest()
    assert latest is not None
    model = resnet18(num_classes=10, small_input=True)
    model.load_state_dict(from_bytes(manager.read_verified(latest, "model.pt")))
    precision = resolve_precision(cfg.precision, torch.device("cpu"))

    def scores(size: int) -> dict[str, float]:
        loader = build_loaders(dataclasses.replace(cfg.data, val_image_size=size), seed=0).val
        return evaluate(model, loader, precision, channels_last=cfg.precision.channels_last)

    # The run's evaluation is that of its weights at 24 px, not at the 16 px it trained at.
    assert result.val == scores(24) and result.val != scores(16)


def test_a_blurpool_network_trains_exports_and_its_checkpoint_fits_only_a_blurpool_run(digits_root: Path,
                                                                                       tmp_path: Path) -> None:
    overrides = [*quick_overrides(digits_root, tmp_path), f"checkpoint.url={tmp_path / 'ckpt'}"]
    cfg = load_config("quickstart", [*overrides, "model.blurpool=true"])
    result = trainer.run(cfg, single_process_context(), [])
    assert result.val["val_top1"] > 0.15  # it learns (chance is 10%)
    manifest = open_checkpoints(str(tmp_path / "ckpt")).latest()
    assert manifest is not None and manifest.meta["architecture"]["blurpool"] is True
    with pytest.raises(IncompatibleSettings, match="'blurpool': True"):
        trainer.run(load_config("quickstart", overrides), single_process_context(), [])
    network = resnet18(num_classes=10, small_input=True)
    from trainer.models import apply_blurpool

    apply_blurpool(network).eval()
    program = torch.export.export(network, (torch.randn(2, 3, 16, 16),),  # as `export` does
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    example = torch.randn(3, 3, 16, 16)
    assert torch.allclose(program.module()(example), network(example), atol=1e-5)


@pytest.mark.parametrize("set_aside", [True, False], ids=["timed-apart", "negative-control-not-set-aside"])
def test_the_first_step_is_timed_apart_from_images_per_s(digits_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, set_aside: bool) -> None:
    import time

    import trainer.loop
    import trainer.meter

    # A first step that takes 6 s (as a compile does): it must show as first_step_s, not in images/s.
    original = trainer.loop.Learner.step
    calls = []

    def slow_first_step(self: trainer.loop.Learner, micro_batches: list, *, step: int) -> torch.Tensor:
        calls.append(step)
        if len(calls) == 1:
            time.sleep(6.0)
        return original(self, micro_batches, step=step)

    monkeypatch.setattr(trainer.loop.Learner, "step", slow_first_step)
    if not set_aside:
        monkeypatch.setattr(trainer.meter.IntervalMeter, "set_aside_first_step", lambda self, *, images: None)
    sink = RecordingSink()
    result = trainer.run(load_config("quickstart", quick_overrides(digits_root, tmp_path)), single_process_context(),
                         [sink])
    train_reports = [m for _, m in sink.reports if "loss" in m]
    first, second = train_reports[0]["images_per_s"], train_reports[1]["images_per_s"]
    if set_aside:
        assert train_reports[0]["first_step_s"] >= 6.0 and all("first_step_s" not in m for m in train_reports[1:])
        # The first report's images/s counts its other 9 steps over their own time, like the second report's.
        assert first > 0.6 * second, (first, second)
    else:  # the 6 s inside the first interval drag its images/s far below the second's
        assert "first_step_s" not in train_reports[0] and first < 0.6 * second, (first, second)
    # The run's totals keep every image and second either way: the first step's time is in the whole-job figure.
    assert result.train_images == 22 * 64 and result.train_time_s >= 6.0


def test_compile_auto_is_on_for_gpus_and_off_for_cpus_and_deepspeed() -> None:
    from trainer.precision import resolve_compile

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    auto = PrecisionConfig()
    assert auto.compile == "auto"
    assert resolve_compile(auto, gpu, strategy="ddp") == "default"
    assert resolve_compile(auto, cpu, strategy="ddp") is None
    assert resolve_compile(auto, gpu, strategy="deepspeed") is None
    assert resolve_compile(PrecisionConfig(compile=True, compile_mode="reduce-overhead"), cpu,
                           strategy="none") == "reduce-overhead"
    assert resolve_compile(PrecisionConfig(compile=False), gpu, strategy="none") is None
    # The loader takes booleans and "auto", nothing that merely compares equal to them.
    assert load_config(None, ["precision.compile=true"]).precision.compile is True
    assert load_config(None, ["precision.compile=auto"]).precision.compile == "auto"
    with pytest.raises(Exception, match="precision.compile=1 is not one of"):
        load_config(None, ["precision.compile=1"])
