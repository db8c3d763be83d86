"""Learning-rate schedule, linear scaling, weight-decay groups and precision choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from configs.schema import OptimConfig, PrecisionConfig, ScheduleConfig
from trainer.models import resnet18
from trainer.optim import build_optimizer, parameter_groups, peak_learning_rate
from trainer.precision import resolve_precision
from trainer.schedule import learning_rate

STEPS_PER_EPOCH = 100


def lrs(cfg: ScheduleConfig, peak_lr: float = 1.0) -> list[float]:
    return [learning_rate(step, peak_lr=peak_lr, steps_per_epoch=STEPS_PER_EPOCH, cfg=cfg)
            for step in range(cfg.epochs * STEPS_PER_EPOCH)]


def test_warmup_is_linear_per_iteration_and_reaches_the_peak() -> None:
    schedule = lrs(ScheduleConfig(epochs=10, warmup_epochs=2))
    assert schedule[:3] == pytest.approx([1 / 200, 2 / 200, 3 / 200])
    assert schedule[199] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(schedule[:199], schedule[1:200], strict=True))


def test_cosine_decays_monotonically_towards_zero() -> None:
    schedule = lrs(ScheduleConfig(epochs=10, warmup_epochs=1))
    after = schedule[100:]
    assert after[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert after[len(after) // 2] == pytest.approx(0.5, abs=0.01)
    assert after[-1] < 1e-3


def test_linear_decay_falls_by_the_same_amount_each_step_to_zero() -> None:
    schedule = lrs(ScheduleConfig(epochs=10, warmup_epochs=2, decay="linear"))
    after = schedule[200:]
    assert after[0] == pytest.approx(1.0) and after[-1] == pytest.approx(1 / 800)
    assert {round(a - b, 12) for a, b in zip(after, after[1:], strict=False)} == {round(1 / 800, 12)}
    assert after[200] == pytest.approx(0.75)  # a quarter of the way: cosine would be at 0.85


def test_step_decay_divides_at_each_milestone() -> None:
    schedule = lrs(ScheduleConfig(epochs=9, warmup_epochs=0, decay="step", step_milestones=(3, 6), step_gamma=0.1))
    assert schedule[299] == pytest.approx(1.0)
    assert schedule[300] == pytest.approx(0.1)
    assert schedule[599] == pytest.approx(0.1)
    assert schedule[600] == pytest.approx(0.01)


def test_linear_scaling_rule() -> None:
    assert peak_learning_rate(OptimConfig(lr=0.1), global_batch_size=1024) == pytest.approx(0.4)
    assert peak_learning_rate(OptimConfig(lr=0.1, scale_lr=False), global_batch_size=1024) == pytest.approx(0.1)


def test_no_weight_decay_on_batchnorm_and_bias() -> None:
    model = resnet18(num_classes=10)
    decay, no_decay = parameter_groups(model, weight_decay=1e-4)
    batchnorm = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert batchnorm | {id(model.fc.bias)} == no_decay_ids
    assert {id(p) for p in decay["params"]} == {id(m.weight) for m in model.modules()
                                                 if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (1e-4, 0.0)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_optimizer_is_sgd_with_the_configured_momentum() -> None:
    optimizer = build_optimizer(resnet18(), OptimConfig(momentum=0.8, nesterov=True), peak_lr=0.3)
    assert isinstance(optimizer, torch.optim.SGD)
    assert [g["lr"] for g in optimizer.param_groups] == [0.3, 0.3]
    assert all(g["momentum"] == 0.8 and g["nesterov"] for g in optimizer.param_groups)


@pytest.mark.parametrize(("dtype", "device", "expected"), [
    ("auto", "cpu", "fp32"), ("auto", "cuda", "bf16"), ("bf16", "cpu", "bf16"), ("fp16", "cuda", "fp16"),
    ("fp32", "cuda", "fp32"),
])
def test_precision_resolution(dtype: str, device: str, expected: str) -> None:
    precision = resolve_precision(PrecisionConfig(dtype=dtype), torch.device(device))  # type: ignore[arg-type]
    assert precision.name == expected


def test_every_precision_has_a_scaler_and_only_fp16_scales() -> None:
    for name, initial_scale in (("fp16", 2.0**16), ("bf16", 1.0), ("fp32", 1.0)):
        precision = resolve_precision(PrecisionConfig(dtype=name), torch.device("cpu"))  # type: ignore[arg-type]
        scaler = precision.grad_scaler()
        assert scaler.is_enabled() and scaler.get_scale() == initial_scale


def test_a_step_with_non_finite_gradients_is_skipped_on_the_device() -> None:
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, OptimConfig(), peak_lr=0.1)
    scaler = resolve_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu")).grad_scaler()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.randn(4, 3)).sum() * float("nan")).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    optimizer.zero_grad()
    scaler.scale(model(torch.randn(4, 3)).sum()).backward()
    scaler.step(optimizer)
    assert not torch.equal(before[0], model.weight)


def test_bf16_autocast_computes_convolutions_in_bf16() -> None:
    precision = resolve_precision(PrecisionConfig(dtype="bf16"), torch.device("cpu"))
    conv = nn.Conv2d(3, 4, 3)
    with precision.autocast():
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16


def test_lars_scales_each_weight_step_by_its_trust_ratio_and_leaves_biases_plain() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    optimizer = build_optimizer(model, OptimConfig(name="lars", lars_eta=0.02, weight_decay=1e-3, momentum=0.9),
                                peak_lr=0.5)
    model(torch.randn(8, 4)).square().sum().backward()
    grad_weight, grad_bias = model.weight.grad.clone(), model.bias.grad.clone()
    optimizer.step()

    trust = 0.02 * weight.norm() / (grad_weight.norm() + 1e-3 * weight.norm())
    torch.testing.assert_close(model.weight, weight - 0.5 * trust * (grad_weight + 1e-3 * weight))
    torch.testing.assert_close(model.bias, bias - 0.5 * grad_bias)
    # Negative control: plain SGD takes a visibly different weight step.
    assert not torch.allclose(model.weight, weight - 0.5 * (grad_weight + 1e-3 * weight), atol=1e-4)


def test_lars_momentum_accumulates_like_sgd() -> None:
    model = nn.Linear(2, 1, bias=False)
    optimizer = build_optimizer(model, OptimConfig(name="lars", weight_decay=0.0, momentum=0.5), peak_lr=1.0)
    start = model.weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.ones(1, 2)).sum().backward()  # gradient 1 for each weight
        optimizer.step()
    # Without weight decay this is plain SGD: steps of 1, then 1 + 0.5.
    torch.testing.assert_close(model.weight, start - 2.5)
