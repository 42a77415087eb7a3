"""CIFAR ShuffleNetV1 (g=3) and ShuffleNetV2 (1x) as in RepDistiller/mdistiller.

Both use a 1x1 stride-1 stem (no max-pool), so a 32x32 input ends at 4x4. Module names
(``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv1`` ..., ``linear``; V2 also ``conv2``/``bn2``) match
the field's checkpoints. Registered as ``shufflev1``/``shufflev2`` (mdistiller's ``ShuffleV1``,
``ShuffleV2``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from topkd.models._base import ClassifierModel, global_pool
from topkd.models._factory import register_model
from topkd.models.features import Tap, TapPoint, TapSpec


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[N, C, H, W] -> [N, g, C/g, H, W] -> transpose -> [N, C, H, W]``."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    """Channel shuffle as a (parameter-free) module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)


# ----------------------------------------------------------------------------- ShuffleNetV1


class ShuffleV1Bottleneck(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; stride 2 concatenates an avg-pool."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups  # the stem output is not grouped
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ShuffleBlock(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))
        self.preact = TapPoint()  # the merge before the final ReLU (mdistiller's ``preact``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(self.preact(out))


class ShuffleNetV1(ClassifierModel):
    """ShuffleNetV1 for CIFAR; stages of ``num_blocks`` with widths ``out_planes``."""

    def __init__(
        self,
        out_planes: Sequence[int] = (240, 480, 960),
        num_blocks: Sequence[int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.feature_dim = out_planes[2]
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, n: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(n):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0  # the avg-pool branch is concatenated
            layers.append(
                ShuffleV1Bottleneck(self.in_planes, out_planes - cat_planes, stride, groups)
            )
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return global_pool(x)

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def feature_taps(self) -> dict[str, TapSpec]:
        """As mdistiller's ``ShuffleNetv1.py``: feats = the stem (after ReLU; read as
        ``layer1``'s input) and the three stage outputs; preact_feats = the stem, then each
        stage's last block before its final ReLU."""
        return _shufflenet_taps(self)


def _shufflenet_taps(model: ShuffleNetV1 | ShuffleNetV2) -> dict[str, TapSpec]:
    stem = Tap("layer1", input=True)
    last = [f"layer{i}.{len(getattr(model, f'layer{i}')) - 1}" for i in (1, 2, 3)]
    return {
        "pooled_feat": ClassifierModel.feature_taps(model)["pooled_feat"],
        "feats": [stem, "layer1", "layer2", "layer3"],
        "preact_feats": [stem, *(f"{b}.preact" for b in last)],
    }


# ----------------------------------------------------------------------------- ShuffleNetV2


class ShuffleV2Block(nn.Module):
    """Split channels in half, transform one half (1x1 - dw3x3 - 1x1), concat, shuffle."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_ratio = split_ratio
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(2)
        self.preact = TapPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        if self.preact.active:  # mdistiller's preact: the *unshuffled* concat before the ReLU
            self.preact(torch.cat([x1, out], 1))
        return self.shuffle(torch.cat([x1, F.relu(out)], 1))


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 unit: two branches (dw3x3-1x1 and 1x1-dw3x3-1x1), concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


SHUFFLEV2_CONFIGS: dict[float, tuple[tuple[int, ...], tuple[int, ...]]] = {
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


class ShuffleNetV2(ClassifierModel):
    """ShuffleNetV2 for CIFAR (``net_size`` 0.5/1/1.5/2; the field uses 1)."""

    def __init__(self, net_size: float = 1.0, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        out_channels, num_blocks = SHUFFLEV2_CONFIGS[float(net_size)]
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.feature_dim = out_channels[3]
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, n: int) -> nn.Sequential:
        layers: list[nn.Module] = [ShuffleV2DownBlock(self.in_channels, out_channels)]
        layers += [ShuffleV2Block(out_channels) for _ in range(n)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return global_pool(F.relu(self.bn2(self.conv2(x))))

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def feature_taps(self) -> dict[str, TapSpec]:
        """As mdistiller's ``ShuffleNetv2.py``: feats = the stem (after ReLU; read as
        ``layer1``'s input) and the three stage outputs (before ``conv2``); preact_feats = the
        stem, then each stage's last block as ``cat([x1, bn3 output])`` before its ReLU and
        *before* the channel shuffle (a reference quirk: its channel order differs from feats)."""
        return _shufflenet_taps(self)


@register_model("shufflev1", family="cifar", input_size=(3, 32, 32), aliases=("shufflenetv1",))
def shufflev1(num_classes: int = 100, **kw: object) -> ShuffleNetV1:
    """ShuffleNetV1 (g=3, widths 240-480-960) for CIFAR (mdistiller ``ShuffleV1``)."""
    return ShuffleNetV1(num_classes=num_classes, **kw)  # type: ignore[arg-type]


@register_model("shufflev2", family="cifar", input_size=(3, 32, 32), aliases=("shufflenetv2",))
def shufflev2(num_classes: int = 100, **kw: object) -> ShuffleNetV2:
    """ShuffleNetV2 1x for CIFAR (mdistiller ``ShuffleV2``)."""
    return ShuffleNetV2(net_size=1.0, num_classes=num_classes, **kw)  # type: ignore[arg-type]
