"""torchvision ResNet-18/34/50 (ImageNet) with the topkd feature/classifier contract.

The models are torchvision's own ``ResNet`` (created with ``weights=None``; nothing is ever
downloaded) with three methods added, so the state_dict keys are exactly torchvision's and their
weight files (e.g. ``resnet50-0676ba61.pth``) load with ``strict=True`` through
:func:`topkd.checkpoints.load_weights`. torchvision is imported lazily.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn

from topkd.models._factory import register_model
from topkd.models.features import Tap, TapSpec, classifier_input_tap


@lru_cache(maxsize=1)
def _resnet_class() -> type[nn.Module]:
    from torchvision.models.resnet import Bottleneck, ResNet

    class TorchvisionResNet(ResNet):
        """torchvision ``ResNet`` + ``forward_features``, ``feature_dim``, ``get_classifier``."""

        @property
        def feature_dim(self) -> int:
            return self.fc.in_features

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return torch.flatten(self.avgpool(x), 1)

        def get_classifier(self) -> nn.Linear:
            return self.fc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.forward_features(x))

        #: mdistiller's preact_feats[0] aliases the stem tensor that its in-place ReLU then
        #: overwrites, so it *is* post-ReLU (= feats[0]); True reproduces that, False gives the
        #: BatchNorm output before the ReLU.
        stem_preact_after_relu: bool = True

        def feature_taps(self) -> dict[str, TapSpec]:
            """As mdistiller's ImageNet ``resnet.py`` (the same network with each block's ReLU
            moved to the next block's start): feats = the stem after ReLU (before max-pool) and
            the four stage outputs; preact_feats = the same before ReLU: the stem (but see
            :attr:`stem_preact_after_relu`), then the input of each stage's last block's final
            ``relu`` call (copied, as torchvision applies those ReLUs in place)."""
            stem = "relu" if self.stem_preact_after_relu else Tap("bn1", clone=True)
            preact: list[Tap | str] = [stem]
            for i in (1, 2, 3, 4):
                layer = getattr(self, f"layer{i}")
                last_relu_call = 2 if isinstance(layer[-1], Bottleneck) else 1
                preact.append(Tap(f"layer{i}.{len(layer) - 1}.relu", input=True, clone=True,
                                  call=last_relu_call))
            return {
                "feats": ["relu", "layer1", "layer2", "layer3", "layer4"],
                "preact_feats": preact,
                "pooled_feat": classifier_input_tap(self),
            }

    TorchvisionResNet.__module__ = __name__
    return TorchvisionResNet


def _build(block_name: str, layers: list[int], num_classes: int, **kw: Any) -> nn.Module:
    from torchvision.models import resnet as tv

    block = {"basic": tv.BasicBlock, "bottleneck": tv.Bottleneck}[block_name]
    return _resnet_class()(block, layers, num_classes=num_classes, **kw)


@register_model("resnet18", family="imagenet", input_size=(3, 224, 224))
def resnet18(num_classes: int = 1000, **kw: Any) -> nn.Module:
    """torchvision ResNet-18 (ImageNet layout; ``weights=None``)."""
    return _build("basic", [2, 2, 2, 2], num_classes, **kw)


@register_model("resnet34", family="imagenet", input_size=(3, 224, 224))
def resnet34(num_classes: int = 1000, **kw: Any) -> nn.Module:
    """torchvision ResNet-34 (ImageNet layout; ``weights=None``)."""
    return _build("basic", [3, 4, 6, 3], num_classes, **kw)


@register_model("resnet50", family="imagenet", input_size=(3, 224, 224))
def resnet50(num_classes: int = 1000, **kw: Any) -> nn.Module:
    """torchvision ResNet-50 (ImageNet layout; ``weights=None``), the usual ImageNet teacher."""
    return _build("bottleneck", [3, 4, 6, 3], num_classes, **kw)
