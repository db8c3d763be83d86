"""The ResNet family against torchvision: same keys, same parameters, same logits, both directions."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tv
from torch import nn

from configs.schema import ModelConfig
from trainer.models import MODELS, BasicBlock, Bottleneck, build_model, macs_per_image

DEPTHS = list(MODELS)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics, so eval-mode logits depend on them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=generator) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)


def images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", DEPTHS)
def test_state_dict_keys_and_shapes_match_torchvision(name: str) -> None:
    ours = MODELS[name]().state_dict()
    theirs = getattr(tv, name)().state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("name", DEPTHS)
def test_parameter_count_matches_torchvision(name: str) -> None:
    def count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    assert count(MODELS[name]()) == count(getattr(tv, name)())


@pytest.mark.parametrize("name", DEPTHS)
def test_torchvision_weights_load_strictly_and_give_the_same_logits(name: str) -> None:
    theirs = getattr(tv, name)().eval()
    randomize_batchnorm(theirs)
    ours = MODELS[name]().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(images()), theirs(images()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", DEPTHS)
def test_our_weights_load_into_torchvision_and_give_the_same_logits(name: str) -> None:
    ours = MODELS[name]().eval()
    randomize_batchnorm(ours, seed=3)
    theirs = getattr(tv, name)().eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(images()), ours(images()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_logit_comparison_catches_a_misplaced_stride(name: str) -> None:
    """Negative control: the round-trip comparison fails when the stride moves within the downsampling blocks
    (for Bottleneck that is the original v1 form, stride on the first 1x1 conv)."""
    reference = getattr(tv, name)().eval()
    randomize_batchnorm(reference)
    moved = MODELS[name]().eval()
    moved.load_state_dict(reference.state_dict())
    for stage in (moved.layer2, moved.layer3, moved.layer4):
        block = stage[0]
        if isinstance(block, Bottleneck):
            block.conv1.stride, block.conv2.stride = (2, 2), (1, 1)
        else:
            block.conv1.stride, block.conv2.stride = (1, 1), (2, 2)
    with torch.no_grad():
        assert not torch.allclose(moved(images()), reference(images()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "resnet152"])
def test_bottleneck_strides_on_the_3x3_conv(name: str) -> None:
    model = MODELS[name]()
    for stage in (model.layer2, model.layer3, model.layer4):
        block = stage[0]
        assert (block.conv1.stride, block.conv2.stride, block.conv3.stride) == ((1, 1), (2, 2), (1, 1))
        assert isinstance(block.downsample[0], nn.Conv2d) and block.downsample[0].stride == (2, 2)


@pytest.mark.parametrize("name", DEPTHS)
def test_projection_shortcut_exactly_where_the_shape_changes(name: str) -> None:
    model = MODELS[name]()
    for stage_index, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        has_projection = [block.downsample is not None for block in stage]
        # Stage 1 of a BasicBlock net keeps 64 channels at stride 1: identity shortcuts only.
        first = stage_index > 0 or isinstance(stage[0], Bottleneck)
        assert has_projection == [first] + [False] * (len(stage) - 1)


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_residual_zeroes_each_blocks_last_batchnorm(zero_init: bool) -> None:
    for name in ("resnet18", "resnet50"):
        model = MODELS[name](zero_init_residual=zero_init)
        blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
        assert blocks
        for block in blocks:
            expected = 0.0 if zero_init else 1.0
            assert torch.all(block.last_bn().weight == expected)
        assert torch.all(model.bn1.weight == 1.0)


def test_zero_init_residual_is_on_by_default() -> None:
    assert torch.all(MODELS["resnet50"]().layer1[0].bn3.weight == 0)


def test_convolutions_use_kaiming_fan_out_init() -> None:
    torch.manual_seed(0)
    conv = MODELS["resnet50"]().layer3[0].conv2  # 256 -> 256, 3x3
    expected_std = (2.0 / (conv.out_channels * 3 * 3)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)


@pytest.mark.parametrize(("name", "features"), [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048),
                                                ("resnet101", 2048), ("resnet152", 2048)])
def test_small_input_stem_keeps_resolution_until_the_first_stage(name: str, features: int) -> None:
    model = MODELS[name](num_classes=10, small_input=True).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    x = images(size=32)
    with torch.no_grad():
        # 32 px: stride 1 stem, then three stride-2 stages -> 4x4.
        assert model.forward_features(x).shape == (2, features, 4, 4)
        assert model(x).shape == (2, 10)


def test_standard_stem_reduces_224_px_to_a_7x7_feature_map() -> None:
    model = MODELS["resnet18"]().eval()
    with torch.no_grad():
        assert model.forward_features(images(1, 224)).shape == (1, 512, 7, 7)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_channels_last_input_gives_the_same_output(name: str) -> None:
    model = MODELS[name]().eval()
    randomize_batchnorm(model)
    x = images()
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        x_nhwc = x.to(memory_format=torch.channels_last)
        assert model.forward_features(x_nhwc).is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x_nhwc), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", DEPTHS)
def test_macs_match_torchvision_published_figures(name: str) -> None:
    weights = tv.get_model_weights(name).IMAGENET1K_V1
    with torch.device("meta"):
        model = MODELS[name]()
    assert macs_per_image(model, 224) / 1e9 == pytest.approx(weights.meta["_ops"], abs=0.001)


def test_resnet50_is_about_4_1_gmacs_at_224_px() -> None:
    with torch.device("meta"):
        model = MODELS["resnet50"]()
    assert macs_per_image(model, 224) == pytest.approx(4.1e9, rel=0.01)
    # MACs scale with the pixel count (all but the FC layer).
    assert macs_per_image(model, 448) == pytest.approx(4 * macs_per_image(model, 224), rel=0.01)


def test_build_model_follows_the_config() -> None:
    model = build_model(ModelConfig(name="resnet34", num_classes=7, small_input=True, zero_init_residual=False))
    assert isinstance(model.layer1[0], BasicBlock) and len(model.layer3) == 6
    assert model.fc.out_features == 7 and model.conv1.kernel_size == (3, 3)
    assert torch.all(model.layer1[0].bn2.weight == 1)


def test_blurpool_keeps_the_state_dict_and_changes_each_downsampling() -> None:
    from trainer.models.blurpool import BlurConv2d, MaxBlurPool2d

    plain = build_model(ModelConfig(name="resnet50"))
    blurred = build_model(ModelConfig(name="resnet50", blurpool=True))
    # torchvision's names and shapes: weights move between the two (and to torchvision) as they are.
    assert {k: v.shape for k, v in blurred.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    blurred.load_state_dict(plain.state_dict())
    # Each stage's strided 3x3 and its strided 1x1 projection (stages 2-4), and the stem's max-pool; not the
    # RGB stem conv (3 input channels).
    replaced = sorted(name for name, m in blurred.named_modules() if isinstance(m, BlurConv2d | MaxBlurPool2d))
    assert replaced == ["layer2.0.conv2", "layer2.0.downsample.0", "layer3.0.conv2", "layer3.0.downsample.0",
                        "layer4.0.conv2", "layer4.0.downsample.0", "maxpool"]
    randomize_batchnorm(plain)
    blurred.load_state_dict(plain.state_dict())
    plain.eval(), blurred.eval()
    with torch.no_grad():
        a, b = plain(images()), blurred(images())
    assert a.shape == b.shape == (2, 1000) and not torch.allclose(a, b)  # same weights, another function


def test_the_blur_is_a_normalised_low_pass_filter() -> None:
    from trainer.models.blurpool import _binomial_filter, blur

    kernel = _binomial_filter()
    flat = torch.full((1, 4, 6, 6), 3.0)
    assert torch.allclose(blur(flat, kernel, stride=1)[..., 1:-1, 1:-1], flat[..., 1:-1, 1:-1])  # keeps a constant
    stripes = torch.tensor([1.0, -1.0] * 3).repeat(1, 1, 6, 1)  # the highest horizontal frequency
    assert blur(stripes, kernel, stride=1)[..., 1:-1, 1:-1].abs().max() == 0  # removed
    assert blur(flat, kernel, stride=2).shape == (1, 4, 3, 3)
