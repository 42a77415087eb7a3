"""Any timm model as ``timm:<name>``, always with ``pretrained=False``.

timm is imported only when such a model is created. The returned object is the timm model itself
(same class hierarchy, same state_dict keys) with ``forward_features`` changed to return the
*pooled* pre-logits features ``(B, D)`` (timm's ``forward_head(..., pre_logits=True)``), plus
``feature_dim``. ``forward`` still returns logits; timm's unpooled token/map features remain
available as ``forward_tokens``.

Feature taps (:class:`topkd.models.FeatureTaps`): ``pooled_feat`` is the classifier's input (the
pre-logits features, = ``forward_features``); ``feats`` are the intermediates of timm's own
``forward_intermediates`` with its defaults (every block/stage, ``norm=False``,
``output_fmt="NCHW"``): for ViTs each block's output tokens without the class/prefix tokens,
reshaped to ``(B, D, H/p, W/p)``; for CNNs the stem and stage outputs. While ``feats`` is tapped,
``forward`` runs ``forward_intermediates`` in place of ``forward_features`` (the same layers: one
forward). timm models have no ``preact_feats``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import nn

from topkd.models.features import Tap, TapPoint, TapSpec, classifier_input_tap

_INTERMEDIATES = "topkd_intermediates"  # the TapPoint receiving forward_intermediates' list


@cache
def _pooled_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of the timm class ``cls`` following the topkd contract."""

    def forward_tokens(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return cls.forward_features(self, x)  # type: ignore[attr-defined]

    def forward_features(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(cls.forward_features(self, x), pre_logits=True)  # type: ignore[operator]

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        tap = self._modules.get(_INTERMEDIATES)
        if tap is not None and tap.active:  # feats are tapped: one forward that also keeps them
            x, intermediates = self.forward_intermediates(x)  # type: ignore[operator]
            tap(intermediates)
        else:
            x = cls.forward_features(self, x)  # type: ignore[attr-defined]
        return self.forward_head(x)  # type: ignore[operator]

    def feature_taps(self: nn.Module) -> dict[str, TapSpec]:
        taps: dict[str, TapSpec] = {"pooled_feat": classifier_input_tap(self)}
        if _INTERMEDIATES in self._modules:
            taps["feats"] = Tap(_INTERMEDIATES)
        return taps

    return type(
        f"TopKD{cls.__name__}",
        (cls,),
        {
            "forward_tokens": forward_tokens,
            "forward_features": forward_features,
            "forward": forward,
            "feature_taps": feature_taps,
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
    if callable(getattr(model, "forward_intermediates", None)):
        model.add_module(_INTERMEDIATES, TapPoint())  # no parameters: state_dict unchanged
    model.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return model
