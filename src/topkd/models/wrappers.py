"""Model wrappers: networks built around a zoo model, rebuilt from a checkpoint's metadata.

Some methods deploy more than the student: a SimKD student classifies through a trained
projector and the (frozen) teacher's classifier. Such a network is a *wrapper*: a module around
the student, registered here by name, whose ``wrapper_spec`` (``{"name", "kwargs"}``) the engine
writes into the exported ``best.pt`` (``meta["wrapper"]``), so that ``topkd eval`` rebuilds the
same network (:func:`wrap_model`) and its accuracy equals the engine's evaluation.

>>> net = wrap_model({"name": "simkd", "kwargs": {...}}, create_model("resnet8x4", 100), 100)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topkd.registry import Registry

__all__ = ["WRAPPERS", "SimKDNet", "SimKDProjector", "register_wrapper", "wrap_model"]

WrapperFactory = Callable[..., nn.Module]
#: name -> ``fn(model, num_classes, **kwargs) -> nn.Module``.
WRAPPERS: Registry[WrapperFactory] = Registry("model wrapper")


def register_wrapper(name: str) -> Callable[[WrapperFactory], WrapperFactory]:
    """Register ``fn(model, num_classes, **kwargs)`` building a wrapper around ``model``."""
    return WRAPPERS.register(name)


def wrap_model(spec: Mapping[str, Any], model: nn.Module, num_classes: int) -> nn.Module:
    """Rebuild the wrapper described by ``spec`` (a ``wrapper_spec``) around ``model``."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"a wrapper spec is a mapping with a 'name' and 'kwargs', got {spec!r}")
    kwargs = dict(spec.get("kwargs") or {})
    try:
        return WRAPPERS.get(str(spec["name"]))(model, num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"wrapper {spec['name']!r}: {e}") from None


# --------------------------------------------------------------------------- SimKD

class SimKDProjector(nn.Sequential):
    """SimKD's projector (``SimKD.transfer``, DefangChen/SimKD ``models/util.py``): a bottleneck
    ``conv1x1(s, t/f)-BN-ReLU-conv3x3(t/f, t/f)-BN-ReLU-conv1x1(t/f, t)-BN-ReLU`` (no conv
    biases, PyTorch's default initialisation as the reference)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2) -> None:
        mid = out_channels // factor
        if mid < 1:
            raise ValueError(f"SimKD projector: {out_channels} teacher channels // factor "
                             f"{factor} leaves no channel; use a smaller factor")
        super().__init__(
            nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.in_channels, self.out_channels, self.factor = in_channels, out_channels, factor


class SimKDNet(nn.Module):
    """A SimKD student as deployed: ``head(avg_pool(projector(align(f))))``.

    ``f`` is the student's last stage output (``feats[-1]``), ``align`` the reference's spatial
    alignment (``adaptive_avg_pool2d`` to ``pool_to x pool_to`` when the student's map is larger
    than the teacher's, else nothing), ``head`` the teacher's classifier (a frozen copy).
    Follows the model contract (``forward_features``, ``feature_dim``, ``get_classifier``).
    """

    def __init__(self, student: nn.Module, projector: SimKDProjector, head: nn.Linear,
                 pool_to: int | None = None) -> None:
        super().__init__()
        from topkd.models.features import FeatureTaps

        self.student, self.projector, self.head = student, projector, head
        self.pool_to = pool_to
        self.feature_dim = head.in_features
        self._taps = FeatureTaps(student, ("feats",))  # hooks only; nothing in the state_dict

    @property
    def wrapper_spec(self) -> dict[str, Any]:
        p = self.projector
        return {"name": "simkd", "kwargs": {
            "in_channels": int(p.in_channels), "teacher_dim": int(p.out_channels),
            "factor": int(p.factor), "pool_to": self.pool_to}}

    def project(self, feat: Tensor) -> Tensor:
        """``projector(align(feat))`` for a student map ``feat``."""
        if self.pool_to is not None:
            feat = F.adaptive_avg_pool2d(feat, (self.pool_to, self.pool_to))
        return self.projector(feat)

    def forward_features(self, x: Tensor) -> Tensor:
        _, feats = self._taps(x)
        return torch.flatten(F.adaptive_avg_pool2d(self.project(feats["feats"][-1]), 1), 1)

    def get_classifier(self) -> nn.Linear:
        return self.head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


@register_wrapper("simkd")
def simkd(model: nn.Module, num_classes: int, *, in_channels: int, teacher_dim: int,
          factor: int = 2, pool_to: int | None = None) -> SimKDNet:
    """The SimKD network around ``model``, with a fresh projector and teacher head."""
    return SimKDNet(model, SimKDProjector(in_channels, teacher_dim, factor),
                    nn.Linear(teacher_dim, num_classes), pool_to)
