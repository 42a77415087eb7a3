"""Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2) as in RepDistiller/mdistiller.

Pre-activation blocks; module names (``conv1``, ``block{1,2,3}.layer.{i}.bn1`` ...,
``convShortcut``, ``bn1``, ``fc``) match the field's checkpoints.

Difference from mdistiller (deliberate, see docs/models.md): its ``forward`` calls
``block2.layer[0].bn1``, ``block3.layer[0].bn1`` and ``bn1`` a second time to log pre-activation
features, which in training mode updates those three BatchNorms' running statistics twice per
step. Here every BatchNorm runs once per forward, so their running stats follow one EMA update
per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from topkd.models._base import ClassifierModel, global_pool, init_weights_
from topkd.models._factory import register_model
from topkd.models.features import Tap, TapSpec


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 with identity or 1x1 projection shortcut.

    As in the reference, when the block changes width the *activated* input feeds the projection
    shortcut; otherwise the raw input is added.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (  # noqa: N815 - reference state_dict name
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A stage of ``n`` wide blocks; the first one may change width/stride."""

    def __init__(
        self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(ClassifierModel):
    """WRN-depth-k for 32x32 inputs, ``depth = 6n + 4``, widths ``16, 16k, 32k, 64k``."""

    def __init__(
        self,
        depth: int,
        widen_factor: int = 1,
        num_classes: int = 100,
        drop_rate: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.feature_dim = ch[3]
        self.fc = nn.Linear(ch[3], num_classes)
        init_weights_(self, zero_linear_bias=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return global_pool(self.relu(self.bn1(x)))

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def feature_taps(self) -> dict[str, TapSpec]:
        """As mdistiller's ``wrn.py``: feats = ``conv1`` and the three stage outputs; preact_feats =
        ``conv1``, then each stage output through the *next* BatchNorm (the first ``bn1`` of the
        next stage, the final ``bn1`` for the last stage), read before its in-place ReLU.

        mdistiller applies those three BatchNorms a second time to build preact_feats, so in
        train mode their running statistics are updated twice per step there; here once.
        """
        return {
            **super().feature_taps(),
            "feats": ["conv1", "block1", "block2", "block3"],
            "preact_feats": [
                "conv1",
                Tap("block2.layer.0.bn1", clone=True),
                Tap("block3.layer.0.bn1", clone=True),
                Tap("bn1", clone=True),
            ],
        }


def _register(depth: int, k: int) -> None:
    name = f"wrn_{depth}_{k}"

    def factory(num_classes: int = 100, **kw: object) -> WideResNet:
        return WideResNet(depth, k, num_classes=num_classes, **kw)  # type: ignore[arg-type]

    factory.__name__ = name
    factory.__doc__ = f"Wide ResNet {depth}-{k} for CIFAR (RepDistiller/mdistiller)."
    register_model(name, family="cifar", input_size=(3, 32, 32))(factory)


for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_d, _k)
