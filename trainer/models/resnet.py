"""The ResNet family of "Deep Residual Learning for Image Recognition" (He et al., 2015).

https://arxiv.org/abs/1512.03385. This is the "v1.5" form: in a downsampling Bottleneck the stride
sits on the 3x3 conv rather than the first 1x1, as in torchvision and NVIDIA's recipes (about +0.5%
top-1 for ~5% more compute). Attribute names follow torchvision's `models/resnet.py` so that state
dicts move between the two key for key. This file knows nothing about devices or training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm always follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution with no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the first carries the stride."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.drop_path: nn.Module = nn.Identity()  # stochastic depth, if on (trainer/models/drop_path.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.drop_path(out) + identity)

    def last_bn(self) -> nn.BatchNorm2d:
        """The BatchNorm closing the residual branch (zero-initialised so the block starts as identity)."""
        return self.bn2


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride: v1.5), 1x1 expand by 4 (ResNet-50/101/152)."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.drop_path: nn.Module = nn.Identity()  # stochastic depth, if on (trainer/models/drop_path.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + identity)

    def last_bn(self) -> nn.BatchNorm2d:
        """The BatchNorm closing the residual branch (zero-initialised so the block starts as identity)."""
        return self.bn3


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """Stem, four stages of 64/128/256/512 planes (x block expansion), global average pool, FC."""

    def __init__(
        self,
        block: Block,
        layers: list[int],
        *,
        num_classes: int = 1000,
        zero_init_residual: bool = True,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        if small_input:
            # For 32-64 px images (CIFAR-style stem): a 7x7/2 conv and a max-pool would shrink a
            # 32 px image to 8 px before the first stage.
            self.conv1: nn.Conv2d = conv3x3(3, self.inplanes)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.num_features = 512 * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each block starts as the identity, which helps large-batch training
            # (Goyal et al., 2017, https://arxiv.org/abs/1706.02677, section 5.1).
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # Projection shortcut (option B of the paper) wherever the shape changes.
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the four stages: the last feature map, before pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool and the classifier: feature map to logits."""
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _resnet(block: Block, layers: list[int], *, num_classes: int, zero_init_residual: bool,
            small_input: bool) -> ResNet:
    """The shared constructor behind the five depths (torchvision's `_resnet`)."""
    return ResNet(block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual,
                  small_input=small_input)


def resnet18(*, num_classes: int = 1000, zero_init_residual: bool = True, small_input: bool = False) -> ResNet:
    """ResNet-18: BasicBlock, [2, 2, 2, 2]."""
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, zero_init_residual=zero_init_residual,
                   small_input=small_input)


def resnet34(*, num_classes: int = 1000, zero_init_residual: bool = True, small_input: bool = False) -> ResNet:
    """ResNet-34: BasicBlock, [3, 4, 6, 3]."""
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, zero_init_residual=zero_init_residual,
                   small_input=small_input)


def resnet50(*, num_classes: int = 1000, zero_init_residual: bool = True, small_input: bool = False) -> ResNet:
    """ResNet-50: Bottleneck, [3, 4, 6, 3]."""
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, zero_init_residual=zero_init_residual,
                   small_input=small_input)


def resnet101(*, num_classes: int = 1000, zero_init_residual: bool = True, small_input: bool = False) -> ResNet:
    """ResNet-101: Bottleneck, [3, 4, 23, 3]."""
    return _resnet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, zero_init_residual=zero_init_residual,
                   small_input=small_input)


def resnet152(*, num_classes: int = 1000, zero_init_residual: bool = True, small_input: bool = False) -> ResNet:
    """ResNet-152: Bottleneck, [3, 8, 36, 3]."""
    return _resnet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, zero_init_residual=zero_init_residual,
                   small_input=small_input)


MODELS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
}
