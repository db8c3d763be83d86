"""Stochastic depth: timm's rates, torchvision's state dict, identity in evaluation, and draws that depend only
on (seed, step, micro-batch, rank)."""

from __future__ import annotations

import timm
import torch
import torchvision.models as tv

from configs.schema import ModelConfig
from trainer.models import DropPathSeeds, build_model
from trainer.models.drop_path import DropPath


def resnet50_with_drop_path(rate: float) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="resnet50", num_classes=10, drop_path_rate=rate, zero_init_residual=False))


def test_rates_grow_linearly_over_the_blocks_as_in_timm() -> None:
    ours = [block.drop_path for stage in ("layer1", "layer2", "layer3", "layer4")
            for block in getattr(resnet50_with_drop_path(0.05), stage)]
    reference = timm.create_model("resnet50", drop_path_rate=0.05, pretrained=False)
    theirs = [block.drop_path for stage in ("layer1", "layer2", "layer3", "layer4")
              for block in getattr(reference, stage)]
    assert len(ours) == len(theirs) == 16
    assert not isinstance(ours[0], DropPath) and theirs[0] is None  # rate 0 at the first block
    assert [m.rate for m in ours[1:]] == [m.drop_prob for m in theirs[1:]]
    assert ours[-1].rate == 0.05


def test_the_state_dict_stays_torchvisions_and_evaluation_keeps_every_branch() -> None:
    plain, dropping = resnet50_with_drop_path(0.0), resnet50_with_drop_path(0.5)
    assert list(dropping.state_dict()) == list(tv.resnet50().state_dict())
    dropping.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 64, 64)
    plain.eval(), dropping.eval()
    with torch.no_grad():
        assert torch.equal(plain(images), dropping(images))
        # Negative control: in training the branches drop, and the output changes.
        plain.train(), dropping.train()
        assert not torch.allclose(plain(images), dropping(images))


def test_draws_repeat_for_the_same_step_micro_batch_and_rank_only() -> None:
    model = resnet50_with_drop_path(0.5).train()
    images = torch.randn(4, 3, 32, 32)

    def logits(step: int, micro_batch: int, rank: int) -> torch.Tensor:
        DropPathSeeds(seed=7, rank=rank).seed_micro_batch(step=step, micro_batch=micro_batch)
        with torch.no_grad():
            return model(images)

    first = logits(3, 0, 0)
    torch.rand(5)  # whatever ran in between does not matter
    assert torch.equal(logits(3, 0, 0), first)
    for other in ((4, 0, 0), (3, 1, 0), (3, 0, 1)):
        assert not torch.equal(logits(*other), first), other


def test_a_branch_is_dropped_per_image_at_its_rate_and_kept_ones_are_rescaled() -> None:
    torch.manual_seed(0)
    out = DropPath(0.25).train()(torch.ones(20_000, 1, 1, 1)).flatten()
    assert out.unique().tolist() == [0.0, torch.tensor(1 / 0.75).item()]
    assert abs(float((out == 0).float().mean()) - 0.25) < 0.01
