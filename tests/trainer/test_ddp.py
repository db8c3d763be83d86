"""DDP over gloo with 2 real processes: it agrees with one process, evaluates exactly and resumes exactly."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import trainer
from configs import RunConfig, load_config
from tests.multiproc import run_ranks
from trainer.checkpoint import open_checkpoints
from trainer.dist import single_process_context
from trainer.state import from_bytes

pytestmark = pytest.mark.multiproc


def config(root: Path, checkpoint_dir: Path, *extra: str) -> RunConfig:
    # Global batch 64: 2 ranks x 32, or 1 rank x 2 micro-batches of 32 (each BatchNorm sees 32 images either way).
    return load_config("quickstart", [
        f"data.root={root}", "data.dataset=folder", "data.image_size=8", "data.batch_size=32",
        "data.dali_threads=1", "data.loader_workers=0", "schedule.epochs=1", f"checkpoint.url={checkpoint_dir}", *extra,
    ])


def final_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    manager = open_checkpoints(str(checkpoint_dir), keep_last=1)
    manifest = manager.latest()
    assert manifest is not None
    return from_bytes(manager.read(manifest.step, "model.pt"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The ranks run one thread each; the reference must too, since the thread count changes the order of
    float sums inside convolutions, and BatchNorm nets amplify such last-bit differences step by step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_ranks_match_one_rank_with_the_same_global_batch(digits_root: Path, tmp_path: Path,
                                                              one_thread: None) -> None:
    ddp = run_ranks(config(digits_root, tmp_path / "ddp", "distributed.strategy=ddp"))
    single = trainer.run(config(digits_root, tmp_path / "single", "optim.accumulation_steps=2"),
                         single_process_context(), [])
    assert ddp[0].steps == ddp[1].steps == single.steps == 1442 // 64
    assert ddp[0].train_images == single.train_images == 22 * 64  # counted over both ranks

    # Bitwise: DDP averages (g0 + g1) / 2, accumulation sums g0 / 2 + g1 / 2; halving is exact in floats.
    ddp_weights, single_weights = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single")
    parameters = [k for k in single_weights if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(ddp_weights[k], single_weights[k]) for k in parameters)
    # Negative control: the comparison sees a 2% change of the learning rate.
    trainer.run(config(digits_root, tmp_path / "shifted", "optim.accumulation_steps=2", "optim.lr=0.051"),
                single_process_context(), [])
    shifted = final_weights(tmp_path / "shifted")
    assert not all(torch.equal(shifted[k], single_weights[k]) for k in parameters)


def test_evaluation_over_uneven_shards_equals_single_process(digits_root: Path, tmp_path: Path) -> None:
    # 355 val images over 2 ranks: 178 + 177, in batches of 32 with a partial last batch on each rank.
    ddp = run_ranks(config(digits_root, tmp_path / "ddp", "distributed.strategy=ddp"))
    assert ddp[0].val == ddp[1].val
    assert ddp[0].val["val_images"] == 355

    # The checkpoint evaluated in one process gives the same numbers: counts are exact over uneven shards,
    # and the saved BatchNorm statistics are the ones every rank evaluated with (rank 0's, broadcast first).
    from data_pipeline import build_loaders
    from trainer.evaluate import evaluate
    from trainer.models import build_model
    from trainer.precision import resolve_precision

    cfg = config(digits_root, tmp_path)
    model = build_model(cfg.model)
    model.load_state_dict(final_weights(tmp_path / "ddp"))
    loaders = build_loaders(cfg.data, seed=cfg.seed)
    single = evaluate(model, loaders.val, resolve_precision(cfg.precision, torch.device("cpu")), channels_last=True)
    assert single["val_top1"] == ddp[0].val["val_top1"] and single["val_top5"] == ddp[0].val["val_top5"]
    assert single["val_loss"] == pytest.approx(ddp[0].val["val_loss"], rel=1e-5)


def test_two_ranks_interrupted_mid_epoch_resume_to_bitwise_identical_weights(digits_root: Path,
                                                                            tmp_path: Path) -> None:
    # 2 epochs of 22 steps; checkpoints at 14, 22, 28 (interval) and 44; the crash comes at step 30. With
    # LAMB, BCE, clipping and stochastic depth (seeded per rank), whose state and draws must resume exactly.
    extra = ["distributed.strategy=ddp", "schedule.epochs=2", "checkpoint.interval_steps=14",
             "checkpoint.keep_last=10", "tracking.log_interval_steps=10", "optim.name=lamb", "optim.lr=0.004",
             "optim.weight_decay=0.02", "optim.loss=bce", "optim.clip_grad_norm=1.0", "model.drop_path_rate=0.1"]
    whole = run_ranks(config(digits_root, tmp_path / "whole", *extra))
    assert run_ranks(config(digits_root, tmp_path / "resumed", *extra), crash_at=30) == [None, None]
    manager = open_checkpoints(str(tmp_path / "resumed"), keep_last=10)
    latest = manager.latest()
    assert latest is not None and latest.step == 28 and set(latest.files) == {
        "model.pt", "train_state.pt", "rank_0.pt", "rank_1.pt"}
    resumed = run_ranks(config(digits_root, tmp_path / "resumed", *extra))
    assert [r.start_step for r in resumed] == [28, 28] and resumed[0].steps == whole[0].steps == 44
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed[0].val == whole[0].val



def test_sigterm_to_one_rank_stops_every_rank_at_the_same_checkpoint(digits_root: Path, tmp_path: Path) -> None:
    extra = ["distributed.strategy=ddp", "tracking.log_interval_steps=10"]
    whole = run_ranks(config(digits_root, tmp_path / "whole", *extra))
    # Rank 1 alone gets SIGTERM after step 10 (its report); it votes to stop after step 11, and both ranks
    # read that vote two steps later, after step 13, where they stop together, between reports.
    stopped = run_ranks(config(digits_root, tmp_path / "stopped", *extra), sigterm=(1, 10))
    where = tmp_path / "stopped" / "step_000000013"
    assert stopped[0] == f"stopped on SIGTERM at step 13; resume from {where}"
    assert re.fullmatch(rf"stopped on SIGTERM at step 13, checkpoint committed \d+\.\d s after this process's "
                        rf"SIGTERM \(within launch.preempt_grace_s=30\); resume from {re.escape(str(where))}",
                        stopped[1]), stopped[1]
    manager = open_checkpoints(str(tmp_path / "stopped"), keep_last=1)
    latest = manager.latest()
    assert latest is not None and latest.step == 13 and {"rank_0.pt", "rank_1.pt"} <= set(latest.files)
    resumed = run_ranks(config(digits_root, tmp_path / "stopped", *extra))
    assert [r.start_step for r in resumed] == [13, 13] and resumed[0].steps == whole[0].steps == 22
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_at_an_epochs_last_step_evaluates_that_epoch_before_it_ends(digits_root: Path,
                                                                            tmp_path: Path) -> None:
    # One process, one epoch of 22 steps: SIGTERM after step 19 makes step 22 the stop, the epoch's last step.
    extra = ["distributed.strategy=none", "optim.accumulation_steps=2", "tracking.log_interval_steps=1"]
    stopped = run_ranks(config(digits_root, tmp_path, *extra), world_size=1, sigterm=(0, 19))
    assert stopped[0].startswith("stopped on SIGTERM at step 22, checkpoint committed")
    manifest = open_checkpoints(str(tmp_path), keep_last=1).latest()
    # The epoch's evaluation was not skipped: a resume starts after it and would never run it.
    assert manifest is not None and manifest.step == 22 and 0 < manifest.meta["val_top1"] <= 1
    resumed = run_ranks(config(digits_root, tmp_path, *extra), world_size=1)
    assert (resumed[0].start_step, resumed[0].steps, resumed[0].val["val_top1"]) == (22, 22, manifest.meta["val_top1"])


def test_ranks_that_do_not_finish_in_time_are_killed_and_reported(digits_root: Path, tmp_path: Path) -> None:
    import psutil

    before = set(psutil.Process().children(recursive=True))
    with pytest.raises(TimeoutError, match="2 ranks did not finish within 2 s; killed"):
        run_ranks(config(digits_root, tmp_path, "distributed.strategy=ddp"), timeout_s=2)
    psutil.wait_procs([p for p in psutil.Process().children(recursive=True) if p not in before], timeout=30)
    assert [p for p in psutil.Process().children(recursive=True) if p not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE] == []
