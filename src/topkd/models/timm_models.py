"""Any timm model as ``timm:<name>``, always with ``pretrained=False``.

timm is imported only when such a model is created. The returned object is the timm model itself
(same class hierarchy, same state_dict keys) with ``forward_features`` changed to return the
*pooled* pre-logits features ``(B, D)`` (timm's ``forward_head(..., pre_logits=True)``), plus
``feature_dim``. ``forward`` still returns logits; timm's unpooled token/map features remain
available as ``forward_tokens``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import nn


@cache
def _pooled_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of the timm class ``cls`` following the topkd contract."""

    def forward_tokens(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return cls.forward_features(self, x)  # type: ignore[attr-defined]

    def forward_features(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(cls.forward_features(self, x), pre_logits=True)  # type: ignore[operator]

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(cls.forward_features(self, x))  # type: ignore[operator]

    return type(
        f"TopKD{cls.__name__}",
        (cls,),
        {
            "forward_tokens": forward_tokens,
            "forward_features": forward_features,
            "forward": forward,
            "__doc__": f"timm ``{cls.__name__}`` whose forward_features returns pooled (B, D).",
        },
    )


def create_timm_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=..., **kwargs)`` + the contract.

    ``in_channels`` is accepted as an alias of timm's ``in_chans``. ``pretrained=True`` and
    ``pretrained_cfg_overlay``/``checkpoint_path`` pointing at downloads are refused: load
    local weights with :func:`topkd.checkpoints.load_weights` instead.
    """
    import timm

    if kwargs.pop("pretrained", False):
        raise ValueError(
            "topkd never downloads weights: create the model, then load a local file with "
            "topkd.checkpoints.load_weights(model, path)"
        )
    if "in_channels" in kwargs:
        kwargs["in_chans"] = kwargs.pop("in_channels")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if not hasattr(model, "forward_head"):
        raise TypeError(f"timm model {name!r} has no forward_head(); cannot pool its features")
    model.__class__ = _pooled_class(type(model))
    model.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return model
