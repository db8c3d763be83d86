"""AdamW and LAMB, binary cross-entropy and gradient clipping, against timm's reference implementations where
"ResNet strikes back" used them."""

from __future__ import annotations

import pytest
import torch
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy as TimmBinaryCrossEntropy
from timm.optim import Lamb as TimmLamb
from torch import nn

from configs.schema.base import InvalidValue
from configs.schema import OptimConfig, PrecisionConfig
from trainer.losses import build_criterion
from trainer.models import resnet18
from trainer.optim import build_optimizer, parameter_groups
from trainer.precision import resolve_precision
from trainer.strategy.single import SingleStrategy


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return resnet18(num_classes=10, small_input=True, zero_init_residual=False)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        images, labels = torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


def test_lamb_steps_as_timms_lamb_with_the_trust_ratio_only_where_weights_decay() -> None:
    ours, reference = small_resnet(), small_resnet()
    train_steps(ours, build_optimizer(ours, OptimConfig(name="lamb", weight_decay=0.02), peak_lr=8e-3))
    # timm's Lamb as RSB ran it, less its built-in global clipping (ours is optim.clip_grad_norm).
    train_steps(reference, TimmLamb(parameter_groups(reference, 0.02), lr=8e-3, max_grad_norm=None))
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    # Negative control: the trust ratio on BatchNorm and bias parameters too (timm's always_adapt).
    adapted = small_resnet()
    train_steps(adapted, TimmLamb(parameter_groups(adapted, 0.02), lr=8e-3, max_grad_norm=None, always_adapt=True))
    assert not torch.allclose(adapted.bn1.bias, ours.bn1.bias, atol=1e-4)


@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd"])
def test_non_finite_gradients_skip_the_step_and_a_finite_one_moves_the_weights(name: str) -> None:
    model = small_resnet()
    optimizer = build_optimizer(model, OptimConfig(name=name), peak_lr=0.01)  # type: ignore[arg-type]
    strategy = SingleStrategy(model, optimizer, resolve_precision(PrecisionConfig(dtype="fp32"),
                                                                  torch.device("cpu")).grad_scaler(),
                              clip_grad_norm=1.0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    images = torch.randn(4, 3, 16, 16)
    strategy.backward(model(images).sum() * float("nan"))
    strategy.step()
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    strategy.backward(model(images).sum())
    strategy.step()
    assert not torch.equal(before["conv1.weight"], model.conv1.weight)
    assert all(torch.isfinite(v).all() for v in model.parameters())


def test_clipping_acts_on_the_unscaled_fp16_gradients() -> None:
    """With fp16's loss scale of 2**16 the update equals fp32's: clipping saw the true gradient norm."""
    updates = {}
    for dtype in ("fp32", "fp16"):
        model = nn.Linear(4, 3)
        torch.nn.init.constant_(model.weight, 0.5)
        torch.nn.init.constant_(model.bias, 0.5)
        optimizer = build_optimizer(model, OptimConfig(momentum=0.0, weight_decay=0.0), peak_lr=1.0)
        scaler = resolve_precision(PrecisionConfig(dtype=dtype), torch.device("cpu")).grad_scaler()  # type: ignore[arg-type]
        strategy = SingleStrategy(model, optimizer, scaler, clip_grad_norm=0.1)
        strategy.backward(model(torch.ones(2, 4)).square().sum())
        strategy.step()
        updates[dtype] = 0.5 - torch.cat([model.weight.detach().flatten(), model.bias.detach()])
    # The step of plain SGD at lr 1 is the clipped gradient: global norm 0.1 (weight and bias together).
    assert float(updates["fp32"].norm()) == pytest.approx(0.1, rel=1e-5)
    torch.testing.assert_close(updates["fp16"], updates["fp32"])


def test_bce_is_timms_for_labels_and_for_mixed_targets() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    for smoothing, threshold in ((0.0, None), (0.1, None), (0.0, 0.2), (0.1, 0.2)):
        ours = build_criterion(OptimConfig(loss="bce", label_smoothing=smoothing, bce_target_threshold=threshold),
                               num_classes=10)
        reference = TimmBinaryCrossEntropy(smoothing=smoothing, target_threshold=threshold)
        torch.testing.assert_close(ours(logits, labels), reference(logits, labels))
        # trainer/mix.py mixes each image with its mirror in the batch, as timm's Mixup, but leaves the
        # smoothing to the loss; timm smooths in mixup_target and its loss then takes the targets as they are.
        lam = 0.7
        one_hot = nn.functional.one_hot(labels, 10).float()
        mixed = one_hot * lam + one_hot.flip(0) * (1 - lam)
        torch.testing.assert_close(ours(logits, mixed),
                                   reference(logits, mixup_target(labels, 10, lam=lam, smoothing=smoothing)))
    # Negative control: the threshold changes the loss of mixed targets (0.3 of a class counts as present).
    plain = build_criterion(OptimConfig(loss="bce", label_smoothing=0.0), num_classes=10)
    thresholded = build_criterion(OptimConfig(loss="bce", label_smoothing=0.0, bce_target_threshold=0.2),
                                  num_classes=10)
    assert not torch.allclose(plain(logits, mixed), thresholded(logits, mixed))


def test_ce_stays_the_default_loss() -> None:
    assert isinstance(build_criterion(OptimConfig(), num_classes=10), nn.CrossEntropyLoss)


@pytest.mark.parametrize(("values", "key"), [
    ({"adam_betas": (0.9, 1.0)}, "adam_betas"),
    ({"adam_eps": 0.0}, "adam_eps"),
    ({"bce_target_threshold": 0.2}, "bce_target_threshold"),  # with loss ce
    ({"loss": "bce", "bce_target_threshold": 1.0}, "bce_target_threshold"),
    ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
])
def test_bad_values_are_refused_naming_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(InvalidValue, match=key):
        OptimConfig(**values)  # type: ignore[arg-type]
