"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) as in RepDistiller/mdistiller.

Three stages of basic blocks, ``depth = 6n + 2``. Module names (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv1`` ..., ``downsample.{0,1}``, ``fc``) match the field's code so their
released checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from topkd.models._base import ClassifierModel, global_pool, init_weights_
from topkd.models._factory import register_model
from topkd.models.features import TapPoint, TapSpec


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.preact = TapPoint()  # the sum before the final ReLU (mdistiller's ``preact``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.preact(out + shortcut))


class CifarResNet(ClassifierModel):
    """ResNet for 32x32 inputs: ``conv1`` -> 3 stages (stride 1, 2, 2) -> global pool -> ``fc``.

    Args:
        depth: ``6n + 2`` (8, 14, 20, 32, 44, 56, 110, ...).
        num_filters: ``[stem, stage1, stage2, stage3]`` widths.
        num_classes: size of the output layer.
        in_channels: input channels (3 for CIFAR; 1 for Fashion-MNIST).
    """

    def __init__(
        self,
        depth: int,
        num_filters: Sequence[int],
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.feature_dim = num_filters[3] * BasicBlock.expansion
        self.fc = nn.Linear(self.feature_dim, num_classes)
        init_weights_(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return global_pool(x)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def feature_taps(self) -> dict[str, TapSpec]:
        """As mdistiller's ``resnet.py``: feats = stem (after ReLU) and the three stage outputs;
        preact_feats = the stem, then each stage's last block before its final ReLU."""
        last = [f"layer{i}.{len(getattr(self, f'layer{i}')) - 1}" for i in (1, 2, 3)]
        return {
            **super().feature_taps(),
            "feats": ["relu", "layer1", "layer2", "layer3"],
            "preact_feats": ["relu", *(f"{b}.preact" for b in last)],
        }


_BASE = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


def _register(name: str, depth: int, filters: Sequence[int]) -> None:
    def factory(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, filters, num_classes=num_classes, in_channels=in_channels)

    factory.__name__ = name
    factory.__doc__ = f"CIFAR ResNet-{depth}, widths {list(filters)} (RepDistiller/mdistiller)."
    register_model(name, family="cifar", input_size=(3, 32, 32))(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, _BASE)
_register("resnet8x4", 8, _X4)
_register("resnet32x4", 32, _X4)
