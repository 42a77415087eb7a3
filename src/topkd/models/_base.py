"""The contract every topkd model follows, as a small base class.

``forward(x)`` returns logits, ``forward_features(x)`` the pooled, flattened penultimate features
``(B, feature_dim)``, and ``get_classifier()`` the final :class:`torch.nn.Linear`, so that
``model(x) == model.get_classifier()(model.forward_features(x))``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from topkd.models.features import TapSpec, classifier_input_tap


class ClassifierModel(nn.Module):
    """Base class: subclasses implement :meth:`forward_features` and :meth:`get_classifier`.

    Subclasses must set ``feature_dim``. The default :meth:`forward` is
    ``get_classifier()(forward_features(x))``, which keeps logits and features consistent.
    """

    feature_dim: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_classifier(self) -> nn.Linear:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_classifier()(self.forward_features(x))

    def feature_taps(self) -> dict[str, TapSpec]:
        """Where :class:`topkd.models.FeatureTaps` reads each feature kind (see
        :mod:`topkd.models.features`). By default only ``pooled_feat``: the classifier's input.
        """
        return {"pooled_feat": classifier_input_tap(self)}


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pool ``(B, C, H, W) -> (B, C)`` as one ``H x W`` average-pool window.

    Bitwise equal to the field's fixed ``AvgPool2d(k)`` / ``F.avg_pool2d(x, k)`` at the native
    input size (where the final map is exactly ``k x k``), and still global at other input sizes
    (e.g. 28x28 Fashion-MNIST).
    """
    return torch.flatten(nn.functional.avg_pool2d(x, kernel_size=x.shape[-2:]), 1)


def adaptive_global_pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pool via ``adaptive_avg_pool2d(x, 1)``, for references that use it."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class GlobalAvgPool(nn.Module):
    """Parameter-free module form of :func:`global_pool`, keeping the spatial dims (B, C, 1, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x, kernel_size=x.shape[-2:])


def init_weights_(model: nn.Module, *, linear_std: float | None = None,
                  zero_linear_bias: bool = False) -> None:
    """The initialisation of the field's CIFAR models (RepDistiller/mdistiller), in one place.

    Conv weights ``~ N(0, 2 / fan_out)`` (He, fan-out; conv biases 0), BatchNorm weight 1 and
    bias 0. Linear layers keep PyTorch's default unless ``linear_std`` is given (weights
    ``~ N(0, linear_std)``, bias 0) or ``zero_linear_bias`` is set: the references differ there.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(m.bias)
