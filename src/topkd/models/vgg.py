"""CIFAR VGG with BatchNorm (vgg8/11/13/16/19 = the field's ``vgg*_bn``).

Five conv blocks (``block0`` ... ``block4``; each a Sequential of conv-BN-ReLU whose last ReLU
is applied after it, as ``relu0`` ... ``relu4``), max-pools between the first four, global
average pool, and a single ``classifier`` Linear(512, C), as in RepDistiller/mdistiller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from topkd.models._base import ClassifierModel, adaptive_global_pool, init_weights_
from topkd.models._factory import register_model
from topkd.models.features import TapSpec

CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [
        [64, 64],
        [128, 128],
        [256, 256, 256, 256],
        [512, 512, 512, 512],
        [512, 512, 512, 512],
    ],
}


def _make_block(widths: Sequence[int], cin: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers.append(nn.Conv2d(cin, w, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(w))
        layers.append(nn.ReLU(inplace=True))
        cin = w
    return nn.Sequential(*layers[:-1])  # the block's last ReLU runs in forward


class VGG(ClassifierModel):
    """VGG for 32x32 (and 64x64) inputs.

    As in mdistiller (``if h == 64: x = self.pool3(x)``), the fourth max-pool is applied only to
    inputs of height exactly 64 (Tiny-ImageNet), so the last block runs at 4x4 for 32x32 inputs,
    2x2 for 28x28 and 12x12 for 96x96 (STL-10): the global average pool then covers it.
    """

    def __init__(
        self,
        cfg: Sequence[Sequence[int]],
        batch_norm: bool = True,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.block0 = _make_block(cfg[0], in_channels, batch_norm)
        self.block1 = _make_block(cfg[1], cfg[0][-1], batch_norm)
        self.block2 = _make_block(cfg[2], cfg[1][-1], batch_norm)
        self.block3 = _make_block(cfg[3], cfg[2][-1], batch_norm)
        self.block4 = _make_block(cfg[4], cfg[3][-1], batch_norm)
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        # the blocks' last ReLUs, as modules so that their outputs can be tapped (no parameters)
        self.relu0, self.relu1, self.relu2, self.relu3, self.relu4 = (nn.ReLU() for _ in range(5))
        self.feature_dim = cfg[4][-1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        init_weights_(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if h == 64:  # mdistiller's rule (exactly 64, not >= 64)
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return adaptive_global_pool(x)

    def get_classifier(self) -> nn.Linear:
        return self.classifier

    def feature_taps(self) -> dict[str, TapSpec]:
        """As mdistiller's ``vgg.py``: feats = the five blocks after their ReLU; preact_feats =
        block 0 after its ReLU, then blocks 1-4 before it (their last BatchNorm's output)."""
        return {
            **super().feature_taps(),
            "feats": [f"relu{i}" for i in range(5)],
            "preact_feats": ["relu0", *(f"block{i}" for i in range(1, 5))],
        }


def _register(name: str) -> None:
    def factory(num_classes: int = 100, **kw: object) -> VGG:
        return VGG(CFGS[name], batch_norm=True, num_classes=num_classes, **kw)  # type: ignore[arg-type]

    factory.__name__ = name
    factory.__doc__ = f"{name.upper()} with BatchNorm for CIFAR (the field's {name}_bn)."
    register_model(name, family="cifar", input_size=(3, 32, 32), aliases=(f"{name}_bn",))(factory)


for _name in CFGS:
    _register(_name)
