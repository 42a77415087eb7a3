"""CIFAR MobileNetV2 as used in the KD literature (``mobile_half``: expansion 6, width 0.5).

Module names (``conv1.{0,1}``, ``blocks.{s}.{i}.conv.{0..7}``, ``conv2.{0,1}``,
``classifier.0``) match RepDistiller/mdistiller checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from topkd.models._base import ClassifierModel, global_pool, init_weights_
from topkd.models._factory import register_model
from topkd.models.features import TapSpec


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(ClassifierModel):
    """MobileNetV2 for 32x32 inputs (stride-2 stem; final map 2x2 for CIFAR).

    Args:
        expansion: the ``t`` of every block but the first (6 in the field).
        width_mult: channel multiplier (0.5 for ``mobile_half``); the last 1x1 conv keeps 1280
            channels unless ``width_mult > 1``.
    """

    def __init__(
        self,
        num_classes: int = 100,
        expansion: int = 6,
        width_mult: float = 0.5,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        setting = [  # t, c, n, s
            (1, 16, 1, 1),
            (expansion, 24, 2, 1),
            (expansion, 32, 3, 2),
            (expansion, 64, 4, 2),
            (expansion, 96, 3, 1),
            (expansion, 160, 3, 2),
            (expansion, 320, 1, 1),
        ]
        cin = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            cout = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(cin, cout, stride, t))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, self.last_channel, 1, 1)
        self.feature_dim = self.last_channel
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        init_weights_(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return global_pool(self.conv2(x))

    def get_classifier(self) -> nn.Linear:
        return self.classifier[0]  # type: ignore[return-value]

    def feature_taps(self) -> dict[str, TapSpec]:
        """As mdistiller's ``mobilenetv2.py``: feats = the stem ``conv1`` and the outputs of block
        groups 1, 2, 4 and 6 (linear bottlenecks: no ReLU follows them). mdistiller declares no
        preact_feats for this model, and neither do we."""
        feats = ["conv1", *(f"blocks.{i}" for i in (1, 2, 4, 6))]
        return {**super().feature_taps(), "feats": feats}


@register_model("mobilenetv2", family="cifar", input_size=(3, 32, 32), aliases=("mobile_half",))
def mobilenetv2(num_classes: int = 100, **kw: object) -> MobileNetV2:
    """CIFAR MobileNetV2, expansion 6, width 0.5 (the field's ``mobile_half``/``MobileNetV2``)."""
    return MobileNetV2(num_classes=num_classes, **kw)  # type: ignore[arg-type]
