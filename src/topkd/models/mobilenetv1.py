"""ImageNet MobileNetV1 as used for ResNet50 -> MobileNetV1 distillation (mdistiller/CRD).

``model.{0..13}`` (stem conv-BN-ReLU, then 13 depthwise-separable blocks), ``model.14`` the
(parameter-free) average pool, and ``fc`` Linear(1024, C): the same state_dict keys as the
field's checkpoints. 4,231,976 parameters with 1000 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from topkd.models._base import ClassifierModel, GlobalAvgPool
from topkd.models._factory import register_model
from topkd.models.features import Tap, TapSpec


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _conv_dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


_DW_SETTING = (  # (in, out, stride) of the 13 depthwise-separable blocks
    (32, 64, 1),
    (64, 128, 2),
    (128, 128, 1),
    (128, 256, 2),
    (256, 256, 1),
    (256, 512, 2),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 1024, 2),
    (1024, 1024, 1),
)


class MobileNetV1(ClassifierModel):
    """MobileNetV1 (width 1.0) for 224x224 inputs; global average pooling at any input size."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.model = nn.Sequential(
            _conv_bn(in_channels, 32, 2),
            *[_conv_dw(i, o, s) for i, o, s in _DW_SETTING],
            GlobalAvgPool(),  # the reference's AvgPool2d(7) at 224x224
        )
        self.feature_dim = 1024
        self.fc = nn.Linear(1024, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.model(x), 1)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def feature_taps(self) -> dict[str, TapSpec]:
        """As mdistiller's ImageNet ``mobilenetv1.py``: feats = the outputs of blocks 3, 5, 11 and
        13 (strides 4, 8, 16, 32; no stem); preact_feats = the same blocks before their last
        ReLU (their last BatchNorm, copied before the in-place ReLU)."""
        stages = (3, 5, 11, 13)
        return {
            **super().feature_taps(),
            "feats": [f"model.{i}" for i in stages],
            "preact_feats": [Tap(f"model.{i}.4", clone=True) for i in stages],
        }


@register_model("mobilenetv1", family="imagenet", input_size=(3, 224, 224))
def mobilenetv1(num_classes: int = 1000, **kw: object) -> MobileNetV1:
    """ImageNet MobileNetV1 (mdistiller ``MobileNetV1``), the ResNet50 -> MobileNetV1 student."""
    return MobileNetV1(num_classes=num_classes, **kw)  # type: ignore[arg-type]
