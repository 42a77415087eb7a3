"""The contract every topkd model follows, as a small base class.

``forward(x)`` returns logits, ``forward_features(x)`` the pooled, flattened penultimate features
``(B, feature_dim)``, and ``get_classifier()`` the final :class:`torch.nn.Linear`, so that
``model(x) == model.get_classifier()(model.forward_features(x))``.
"""

from __future__ import annotations

import torch
from torch import nn


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
