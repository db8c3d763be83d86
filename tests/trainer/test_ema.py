"""The weight average: its arithmetic, its evaluation beside the model, and its exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import trainer
from tests.multiproc import CrashAt, Interrupt
from tests.trainer.test_resume import config
from trainer.checkpoint import open_checkpoints
from trainer.dist import single_process_context
from trainer.ema import Ema
from trainer.state import from_bytes


def test_update_is_a_lerp_of_every_float_tensor_and_copies_counters() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = Ema(model, decay=0.75)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(1)  # parameters, running statistics and the integer batch counter
    ema.update(model)
    now = model.state_dict()
    for key, value in ema.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.75 * before[key] + 0.25 * now[key], rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, now[key])
    assert not any(p.requires_grad for p in ema.module.parameters())


def ema_run(root: Path, folder: Path, *sinks: object) -> trainer.TrainResult:
    cfg = config(root, folder, "schedule.epochs=1", "optim.ema_decay=0.9")
    return trainer.run(cfg, single_process_context(), list(sinks))  # type: ignore[arg-type]


def final_ema(folder: Path) -> dict[str, torch.Tensor]:
    manager = open_checkpoints(str(folder), keep_last=20)
    manifest = manager.latest()
    assert manifest is not None and manifest.step == 22
    return from_bytes(manager.read(22, "ema.pt"))


def test_the_average_is_evaluated_saved_and_resumed_exactly(digits_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    whole = ema_run(digits_root, tmp_path / "whole")
    assert {"ema_val_top1", "ema_val_top5", "ema_val_loss"} <= whole.val.keys()
    assert whole.val["ema_val_loss"] != whole.val["val_loss"]
    expected = final_ema(tmp_path / "whole")

    # Crash after the checkpoint of step 14, resume: the same average, bit for bit.
    with pytest.raises(Interrupt):
        ema_run(digits_root, tmp_path / "resumed", CrashAt(20))
    assert ema_run(digits_root, tmp_path / "resumed").start_step == 14
    resumed = final_ema(tmp_path / "resumed")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)

    # Negative control: an average that is not restored on resume (it starts again from the initial weights)
    # ends elsewhere.
    monkeypatch.setattr(Ema, "load_state_dict", lambda self, state: None)
    with pytest.raises(Interrupt):
        ema_run(digits_root, tmp_path / "control", CrashAt(20))
    ema_run(digits_root, tmp_path / "control")
    assert not torch.equal(final_ema(tmp_path / "control")["fc.weight"], expected["fc.weight"])


def test_checkpoint_averaging_means_the_weights_and_reestimates_batchnorm_over_the_given_batches() -> None:
    from configs.schema import PrecisionConfig
    from launch.tracking.averaging import average_states, reestimate_batchnorm
    from trainer.precision import resolve_precision

    states = [{"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(3)},
              {"w": torch.tensor([3.0, 6.0]), "bn.num_batches_tracked": torch.tensor(9)}]
    average = average_states(states)
    assert torch.equal(average["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(average["bn.num_batches_tracked"], torch.tensor(9))  # the newest count, not a mean
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 4, 4, generator=generator) * (i + 1), torch.zeros(8)) for i in range(3)]
    network.eval()
    seen = reestimate_batchnorm(network, batches, resolve_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu")),
                                channels_last=False)
    with torch.no_grad():
        batch_means = torch.stack([network[0](images).mean(dim=(0, 2, 3)) for images, _ in batches])
    # The plain mean of the batches' means (not an exponential average with momentum 0.1 from zero).
    torch.testing.assert_close(network[1].running_mean, batch_means.mean(0))
    assert seen == 24 and network[1].momentum == 0.1 and not network.training
