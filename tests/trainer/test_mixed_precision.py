"""bf16 and fp16 runs on the CPU: the paths a GPU takes by default (bf16 autocast) and with fp16 (dynamic loss
scaling) train, checkpoint, resume and evaluate, for one process, DDP and DeepSpeed ZeRO-1.

Kept tiny (ResNet-18 at 8 px on synthetic batches, 4 steps an epoch for one process): bf16 and fp16 on a CPU
without native support are emulated and many times slower than fp32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import trainer
from configs import RunConfig, load_config
from tests.multiproc import CrashAt, Interrupt, run_ranks
from trainer.checkpoint import open_checkpoints
from trainer.dist import single_process_context
from trainer.serialize import from_bytes


def config(checkpoint_dir: Path, dtype: str, *extra: str) -> RunConfig:
    # 2 epochs of 128 // 32 = 4 steps (one rank); checkpoints every 3 steps and at epoch ends (3, 4, 6, 8).
    return load_config("quickstart", [
        "data.dataset=synthetic", "data.synthetic_images=128", "data.synthetic_classes=10", "data.image_size=8",
        "data.batch_size=32", "schedule.epochs=2", "tracking.log_interval_steps=2", f"precision.dtype={dtype}",
        f"checkpoint.url={checkpoint_dir}", "checkpoint.interval_steps=3", "checkpoint.keep_last=10", *extra])


def final(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    manager = open_checkpoints(str(checkpoint_dir))
    manifest = manager.latest()
    assert manifest is not None
    return from_bytes(manager.read(manifest.step, "model.pt")), manifest.meta


# A recipe of "ResNet strikes back"'s levers: LAMB, BCE with a target threshold, clipping, stochastic depth and
# mixup, whose state and draws must all resume exactly; fp16 also clips after unscaling.
TOOLBOX = ["optim.name=lamb", "optim.lr=0.008", "optim.weight_decay=0.02", "optim.loss=bce",
           "optim.bce_target_threshold=0.2", "optim.clip_grad_norm=1.0", "model.drop_path_rate=0.2",
           "data.mixup_alpha=0.2",
           # fp16 convolutions are emulated on CPUs (about 5 s a step at batch 32): the same 4 steps an epoch of 8.
           "data.batch_size=8", "data.synthetic_images=32"]


@pytest.mark.parametrize(("dtype", "extra"), [("bf16", []), ("fp16", TOOLBOX)], ids=["bf16", "fp16-toolbox"])
def test_one_process_mixed_precision_resumes_exactly(dtype: str, extra: list[str], tmp_path: Path) -> None:
    whole = trainer.run(config(tmp_path / "whole", dtype, *extra), single_process_context(), [])
    with pytest.raises(Interrupt):
        trainer.run(config(tmp_path / "resumed", dtype, *extra), single_process_context(), [CrashAt(6)])
    resumed = trainer.run(config(tmp_path / "resumed", dtype, *extra), single_process_context(), [])
    assert resumed.start_step == 4 and resumed.steps == whole.steps == 8
    weights, meta = final(tmp_path / "resumed")
    reference, _ = final(tmp_path / "whole")
    assert all(torch.equal(weights[key], reference[key]) for key in reference)
    assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())
    assert meta["config"]["precision"]["dtype"] == dtype and resumed.val == whole.val
    # Synthetic data evaluates one batch.
    batch_size = config(tmp_path, dtype, *extra).data.batch_size
    assert resumed.val["val_images"] == batch_size and 0 <= resumed.val["val_top1"] <= 1
    manager = open_checkpoints(str(tmp_path / "resumed"))
    scaler = from_bytes(manager.read(8, "train_state.pt"))["scaler"]
    # fp16 scales the loss dynamically from 2**16; bf16 keeps a scale of 1, which changes no value.
    assert scaler["scale"] == (65536.0 if dtype == "fp16" else 1.0)


@pytest.mark.multiproc
@pytest.mark.parametrize(("strategy", "optimizer"), [("ddp", "lamb"), ("deepspeed", "adamw")])
def test_two_ranks_in_bf16_train_checkpoint_resume_and_evaluate(strategy: str, optimizer: str,
                                                               tmp_path: Path) -> None:
    # The shipped ZeRO-1 recipe's combination (DeepSpeed, ZeRO-1, bf16 by torch autocast), shrunk, with the
    # adaptive optimisers, clipping and stochastic depth; 2 ranks of 32 make 4 steps an epoch: checkpoints at
    # 4, 6 (interval) and 8.
    extra = [f"distributed.strategy={strategy}", "distributed.zero_stage=1", "data.synthetic_images=256",
             "checkpoint.interval_steps=6", f"optim.name={optimizer}", "optim.lr=0.001", "optim.clip_grad_norm=1.0",
             "model.drop_path_rate=0.1"]
    cfg = config(tmp_path, "bf16", *extra)
    assert run_ranks(cfg, crash_at=8) == [None, None]  # the crash comes after step 6's checkpoint
    assert open_checkpoints(str(tmp_path)).latest().step == 6  # type: ignore[union-attr]
    results = run_ranks(cfg)
    assert [r.start_step for r in results] == [6, 6] and [r.steps for r in results] == [8, 8]
    assert results[0].val == results[1].val and results[0].val["val_images"] == 64
    weights, meta = final(tmp_path)
    assert meta["step"] == 8 and meta["world_size"] == 2
    assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())
