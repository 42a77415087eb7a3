"""ResNet18/34/50 adapted to CIFAR (3x3 stem, no max-pool) as in mdistiller ``resnetv2.py``.

Registered as ``resnet18_cifar``, ``resnet34_cifar``, ``resnet50_cifar``; ``create_model`` also
accepts mdistiller's exact keys ``ResNet18``/``ResNet50`` for them (lower-case ``resnet50`` is the
torchvision ImageNet model). Module names (``conv1``, ``bn1``, ``layer{1..4}.{i}.shortcut``,
``linear``) match the field's checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from topkd.models._base import ClassifierModel, adaptive_global_pool, init_weights_
from topkd.models._factory import register_model
from topkd.models.features import Tap, TapPoint, TapSpec


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential:
    if stride == 1 and cin == cout:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlockV2(nn.Module):
    """Two 3x3 conv-BN layers with a (projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)
        self.preact = TapPoint()  # the sum before the final ReLU (mdistiller's ``preact``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(self.preact(out + self.shortcut(x)))


class BottleneckV2(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), with a (projection) shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = _shortcut(in_planes, out, stride)
        self.preact = TapPoint()  # the sum before the final ReLU (mdistiller's ``preact``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(self.preact(out + self.shortcut(x)))


class CifarResNetV2(ClassifierModel):
    """Four-stage ResNet (64-128-256-512 x expansion) with a 3x3 stride-1 stem for 32x32 inputs."""

    def __init__(
        self,
        block: type[BasicBlockV2] | type[BottleneckV2],
        num_blocks: Sequence[int],
        num_classes: int = 100,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.feature_dim = 512 * block.expansion
        self.linear = nn.Linear(self.feature_dim, num_classes)
        init_weights_(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BottleneckV2):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlockV2):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self, block: type[BasicBlockV2] | type[BottleneckV2], planes: int, n: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return adaptive_global_pool(x)

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def feature_taps(self) -> dict[str, TapSpec]:
        """As mdistiller's ``resnetv2.py``: feats = stem (after ReLU; read as ``layer1``'s input)
        and the four stage outputs; preact_feats = the stem, then each stage's last block before
        its final ReLU."""
        stem = Tap("layer1", input=True)
        last = [f"layer{i}.{len(getattr(self, f'layer{i}')) - 1}" for i in (1, 2, 3, 4)]
        return {
            **super().feature_taps(),
            "feats": [stem, "layer1", "layer2", "layer3", "layer4"],
            "preact_feats": [stem, *(f"{b}.preact" for b in last)],
        }


@register_model("resnet18_cifar", family="cifar", input_size=(3, 32, 32))
def resnet18_cifar(num_classes: int = 100, **kw: object) -> CifarResNetV2:
    """ResNet-18 for CIFAR (mdistiller ``ResNet18``)."""
    return CifarResNetV2(BasicBlockV2, (2, 2, 2, 2), num_classes, **kw)  # type: ignore[arg-type]


@register_model("resnet34_cifar", family="cifar", input_size=(3, 32, 32))
def resnet34_cifar(num_classes: int = 100, **kw: object) -> CifarResNetV2:
    """ResNet-34 for CIFAR (mdistiller ``ResNet34``)."""
    return CifarResNetV2(BasicBlockV2, (3, 4, 6, 3), num_classes, **kw)  # type: ignore[arg-type]


@register_model("resnet50_cifar", family="cifar", input_size=(3, 32, 32))
def resnet50_cifar(num_classes: int = 100, **kw: object) -> CifarResNetV2:
    """ResNet-50 for CIFAR (mdistiller ``ResNet50``, the ResNet50 -> MobileNetV2 teacher)."""
    return CifarResNetV2(BottleneckV2, (3, 4, 6, 3), num_classes, **kw)  # type: ignore[arg-type]
