"""MobileNetV2 for Tiny-ImageNet (64x64) as in mdistiller ``mv2_tinyimagenet.py``.

Full width, ReLU6, biased convolutions, a 1x1 stem (with padding 1, as in the reference), and
stages ``pre``, ``stage1`` ... ``stage7``, ``conv1``. The reference classifies with a 1x1
convolution ``conv2``; here ``conv2`` is an ``nn.Linear`` (the contract needs a final Linear) and
:func:`topkd.checkpoints.load_weights` accepts the reference's ``(C, 1280, 1, 1)`` weight for it.
"""

from __future__ import annotations

import torch
from torch import nn

from topkd.models._base import ClassifierModel, adaptive_global_pool
from topkd.models._factory import register_model
from topkd.models.features import TapSpec


class LinearBottleNeck(nn.Module):
    """1x1 expand (x t) - 3x3 depthwise - 1x1 project, ReLU6, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, t: int = 6) -> None:
        super().__init__()
        hidden = cin * t
        self.residual = nn.Sequential(
            nn.Conv2d(cin, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1),
            nn.BatchNorm2d(cout),
        )
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        return out + x if self.use_res else out


def _stage(n: int, cin: int, cout: int, stride: int, t: int) -> nn.Sequential:
    return nn.Sequential(
        LinearBottleNeck(cin, cout, stride, t),
        *[LinearBottleNeck(cout, cout, 1, t) for _ in range(n - 1)],
    )


class MobileNetV2TinyImageNet(ClassifierModel):
    """mdistiller's Tiny-ImageNet MobileNetV2 student."""

    def __init__(self, num_classes: int = 200, in_channels: int = 3) -> None:
        super().__init__()
        self.pre = nn.Sequential(
            nn.Conv2d(in_channels, 32, 1, padding=1), nn.BatchNorm2d(32), nn.ReLU6(inplace=True)
        )
        self.stage1 = LinearBottleNeck(32, 16, 1, 1)
        self.stage2 = _stage(2, 16, 24, 2, 6)
        self.stage3 = _stage(3, 24, 32, 2, 6)
        self.stage4 = _stage(4, 32, 64, 2, 6)
        self.stage5 = _stage(3, 64, 96, 1, 6)
        self.stage6 = _stage(3, 96, 160, 1, 6)
        self.stage7 = LinearBottleNeck(160, 320, 1, 6)
        self.conv1 = nn.Sequential(
            nn.Conv2d(320, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)
        )
        self.feature_dim = 1280
        self.conv2 = nn.Linear(1280, num_classes)  # a 1x1 conv on the pooled map in the reference

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        for i in range(1, 8):
            x = getattr(self, f"stage{i}")(x)
        return adaptive_global_pool(self.conv1(x))

    def get_classifier(self) -> nn.Linear:
        return self.conv2

    def feature_taps(self) -> dict[str, TapSpec]:
        """As mdistiller's ``mv2_tinyimagenet.py``: feats = ``pre``, stages 2-4 and ``conv1``; no
        preact_feats. pooled_feat is ``(B, 1280)``; mdistiller's is the same values as
        ``(B, 1280, 1, 1)`` (it classifies with a 1x1 convolution)."""
        return {**super().feature_taps(), "feats": ["pre", "stage2", "stage3", "stage4", "conv1"]}


@register_model("mobilenetv2_tinyimagenet", family="tiny_imagenet", input_size=(3, 64, 64))
def mobilenetv2_tinyimagenet(num_classes: int = 200, **kw: object) -> MobileNetV2TinyImageNet:
    """MobileNetV2 for Tiny-ImageNet (mdistiller ``mobilenetv2_tinyimagenet``)."""
    return MobileNetV2TinyImageNet(num_classes=num_classes, **kw)  # type: ignore[arg-type]
