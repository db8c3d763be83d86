"""DeepSpeed ZeRO-1 and ZeRO-2 over gloo with 2 real processes: they train like DDP, evaluate exactly, resume
bit for bit, and refuse what cannot work."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from configs import IncompatibleSettings, RunConfig, load_config
from tests.multiproc import run_ranks
from trainer.checkpoint import FileRecord, open_checkpoints, step_folder
from trainer.dist import single_process_context
from trainer.state import from_bytes

# `make test` installs the deepspeed extra: without it these tests must fail to import, not skip.
import deepspeed  # noqa: F401, E402

pytestmark = pytest.mark.multiproc

# 2 epochs of 22 steps of 2 x 32 images; checkpoints at 14, 22, 28 (interval) and 44.
COMMON = ["schedule.epochs=2", "checkpoint.interval_steps=14", "checkpoint.keep_last=10",
          "tracking.log_interval_steps=10"]


def config(root: Path, checkpoint_dir: Path, *extra: str) -> RunConfig:
    return load_config("quickstart", [
        f"data.root={root}", "data.dataset=folder", "data.image_size=8", "data.batch_size=32",
        "data.dali_threads=1", "data.loader_workers=0", f"checkpoint.url={checkpoint_dir}", *COMMON, *extra,
    ])


def final_weights(checkpoint_dir: Path) -> tuple[set[str], dict[str, torch.Tensor]]:
    manager = open_checkpoints(str(checkpoint_dir), keep_last=10)
    manifest = manager.latest()
    assert manifest is not None
    return set(manifest.files), from_bytes(manager.read(manifest.step, "model.pt"))


def weights_at(checkpoint_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return from_bytes(open_checkpoints(str(checkpoint_dir), keep_last=10).read(step, "model.pt"))


COMPARED_STEP = 14
"""The step whose weights ZeRO and DDP are compared at: the interval checkpoint. Their arithmetic differs in the
last bit (flat buffers against per-bucket views), and this recipe's BatchNorm net amplifies that quickly:
measured ZeRO-1 against DDP, max |difference| 1e-7 at step 12, 2e-6 at 14, 2e-2 at 20 and 0.15 at the
epoch's end (22); the same at steps 1-8: 0."""


@pytest.fixture(scope="module")
def ddp_weights(digits_root: Path, module_tmp: Path) -> dict[str, torch.Tensor]:
    folder = module_tmp / "ddp"
    run_ranks(config(digits_root, folder, "distributed.strategy=ddp", *SAME_LAYOUT))
    return weights_at(folder, COMPARED_STEP)


# DeepSpeed keeps its weights in NCHW (trainer/strategy/deepspeed.py); with channels-last weights DDP's
# convolutions sum in another order, and BatchNorm nets amplify such last-bit differences step by step.
# In the same layout the two strategies do the same arithmetic.
SAME_LAYOUT = ["precision.channels_last=false", "schedule.epochs=1"]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_trains_exactly_like_ddp_and_evaluates_exactly(stage: int, digits_root: Path, tmp_path: Path,
                                                            ddp_weights: dict[str, torch.Tensor]) -> None:
    extra = ["distributed.strategy=deepspeed", f"distributed.zero_stage={stage}", *SAME_LAYOUT]
    result = run_ranks(config(digits_root, tmp_path, *extra))
    files, final = final_weights(tmp_path)
    weights = weights_at(tmp_path, COMPARED_STEP)
    # Stage 0 keeps the whole optimizer in the module file; stages 1 and 2 give each rank its partition.
    partitions = {f"deepspeed.zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)} if stage else set()
    assert files == {"model.pt", "rank_0.pt", "rank_1.pt", "deepspeed.mp_rank_00_model_states.pt", *partitions}
    assert weights.keys() == ddp_weights.keys()
    # Within rounding, not bitwise (see COMPARED_STEP). A wrong update (a gradient not averaged, a partition
    # not applied) moves weights by lr x gradient at the first step, far more.
    for key, value in weights.items():
        torch.testing.assert_close(value, ddp_weights[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda message, key=key: f"{key}: {message}")

    # Every rank evaluated with rank 0's BatchNorm statistics, which are also the saved ones: DeepSpeed never
    # syncs them by itself, and a rank using its own would shift the numbers below.
    assert result[0].val == result[1].val and result[0].val["val_images"] == 355
    from data_pipeline import build_loaders
    from trainer.evaluate import evaluate
    from trainer.models import build_model
    from trainer.precision import resolve_precision

    cfg = config(digits_root, tmp_path)
    model = build_model(cfg.model)
    model.load_state_dict(final)
    single = evaluate(model, build_loaders(cfg.data, seed=cfg.seed).val,
                      resolve_precision(cfg.precision, torch.device("cpu")), channels_last=False)
    assert (single["val_top1"], single["val_top5"]) == (result[0].val["val_top1"], result[0].val["val_top5"])


# Stage 1 (the shipped 8-GPU recipe's) and stage 2 (whose checkpoint holds each rank's gradient partition
# as well), the latter with AdamW, BCE, clipping (DeepSpeed's own, over all partitions) and stochastic depth.
ADAMW_TOOLBOX = ["optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.05", "optim.loss=bce",
                 "optim.clip_grad_norm=0.5", "model.drop_path_rate=0.1"]


@pytest.mark.parametrize(("stage", "toolbox"), [(1, []), (2, ADAMW_TOOLBOX)], ids=["zero1", "zero2-adamw"])
def test_zero_resumes_mid_epoch_bit_for_bit(stage: int, toolbox: list[str], digits_root: Path,
                                            tmp_path: Path) -> None:
    extra = ["distributed.strategy=deepspeed", f"distributed.zero_stage={stage}", *toolbox]
    whole = run_ranks(config(digits_root, tmp_path / "whole", *extra))
    # Crash at step 30, resume from step 28 (mid-epoch): the same final weights, bit for bit.
    assert run_ranks(config(digits_root, tmp_path / "resumed", *extra), crash_at=30) == [None, None]
    resumed = run_ranks(config(digits_root, tmp_path / "resumed", *extra))
    assert [r.start_step for r in resumed] == [28, 28] and resumed[0].steps == whole[0].steps == 44
    weights, resumed_weights = final_weights(tmp_path / "whole")[1], final_weights(tmp_path / "resumed")[1]
    assert all(torch.equal(resumed_weights[k], weights[k]) for k in weights)
    assert resumed[0].val == whole[0].val


def test_negative_control_zero_resume_without_optimizer_state_differs(digits_root: Path, tmp_path: Path) -> None:
    """Drop the ZeRO optimizer partitions (momentum) from the checkpoint before resuming: the resumed run must
    then end elsewhere, which shows the comparison above would catch a resume that skips them."""
    extra = ["distributed.strategy=deepspeed", "distributed.zero_stage=1"]
    run_ranks(config(digits_root, tmp_path / "whole", *extra))
    run_ranks(config(digits_root, tmp_path / "resumed", *extra), crash_at=30)
    manager = open_checkpoints(str(tmp_path / "resumed"), keep_last=10)
    folder = tmp_path / "resumed" / step_folder(28)
    manifest = json.loads((folder / "manifest.json").read_text())
    for rank in range(2):
        name = f"deepspeed.zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        state = torch.load(io.BytesIO(manager.read(28, name)), weights_only=False)
        for group_state in state["optimizer_state_dict"]["base_optimizer_state"]["state"].values():
            group_state["momentum_buffer"].zero_()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        (folder / name).write_bytes(buffer.getvalue())
        record = FileRecord.of(buffer.getvalue())  # keep step 28 committed and its hashes right
        manifest["files"][name] = {"size": record.size, "sha256": record.sha256}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    resumed_result = run_ranks(config(digits_root, tmp_path / "resumed", *extra))
    assert resumed_result[0].start_step == 28
    whole, resumed = final_weights(tmp_path / "whole")[1], final_weights(tmp_path / "resumed")[1]
    assert not torch.equal(whole["fc.weight"], resumed["fc.weight"])


def test_zero_state_of_two_ranks_does_not_load_into_one(digits_root: Path, tmp_path: Path) -> None:
    extra = ["distributed.strategy=deepspeed", "distributed.zero_stage=1", "schedule.epochs=1"]
    run_ranks(config(digits_root, tmp_path, *extra, "checkpoint.interval_steps=0"))
    # One process with 2 micro-batches keeps the global batch, so only the ZeRO partitioning differs.
    with pytest.raises(Exception, match="partitioned over 2 ranks, this run has 1"):
        run_ranks(config(digits_root, tmp_path, *extra, "optim.accumulation_steps=2"), world_size=1)


@pytest.mark.parametrize(("override", "message"), [
    ("precision.dtype=fp16", "DeepSpeed's loss scaling comes with its fp16 mode"),
    ("optim.name=lars", "trust ratio cannot see whole layers"),
    ("optim.name=lamb", "trust ratio cannot see whole layers; use distributed.strategy='ddp' or zero_stage=0"),
    ("precision.compile=true", "not supported"),
])
def test_deepspeed_refuses_what_it_cannot_do(digits_root: Path, tmp_path: Path, override: str, message: str) -> None:
    cfg = config(digits_root, tmp_path, "distributed.strategy=deepspeed", override)
    import trainer

    with pytest.raises(IncompatibleSettings, match=message):
        trainer.run(cfg, single_process_context(), [])


def test_an_engine_file_with_code_in_it_is_refused() -> None:
    from trainer.strategy.deepspeed import check_weights_only

    buffer = io.BytesIO()
    torch.save({"hook": print}, buffer)
    with pytest.raises(ValueError, match="deepspeed.x.pt holds more than weights"):
        check_weights_only("deepspeed.x.pt", buffer.getvalue())


def test_the_deepspeed_config_says_everything_deepspeed_would_otherwise_default() -> None:
    from configs.schema import DistributedConfig
    from trainer.strategy.deepspeed import deepspeed_config

    config = deepspeed_config(DistributedConfig(strategy="deepspeed", zero_stage=2, bucket_cap_mb=50),
                              micro_batch_size=32, accumulation_steps=4, world_size=8)
    assert config["gradient_clipping"] == 0.0  # DeepSpeed >= 0.19.3 would clip at 1.0
    assert config["fp16"] == {"enabled": False} and config["bf16"] == {"enabled": False}  # autocast instead
    assert config["train_batch_size"] == 32 * 4 * 8 and config["managed_gradient_accumulation"] is False
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 50 * 2**20 // 4,
                                           "allgather_bucket_size": 50 * 2**20 // 4}
    # optim.clip_grad_norm reaches DeepSpeed, which clips the global norm over all partitions.
    assert deepspeed_config(DistributedConfig(strategy="deepspeed"), micro_batch_size=32, accumulation_steps=1,
                            world_size=2, clip_grad_norm=0.5)["gradient_clipping"] == 0.5
