"""Distillation losses for PyTorch.

* Functional API (the public contract in ``docs/spec.md``): :func:`kd_loss`, :func:`dkd_loss`,
  :func:`standardize`, :func:`tsm`, :func:`tdl_loss`, :func:`contrastive_loss`,
  :func:`topkd_loss`.
* Module front-ends: :class:`KDLoss`, :class:`DKDLoss`, :class:`TSM`, :class:`TDLLoss`,
  :class:`ContrastiveLoss`, :class:`TopKDLoss`.
* The composable criterion :class:`DistillationLoss` driven by :class:`LossSpec`, with named
  presets in :data:`METHODS` (``LossSpec.preset("kd+tsm+tdl")``).

Depends on torch and :mod:`topkd.registry` only. See ``docs/losses.md``.
"""

from .criterion import BASES, METHODS, DistillationLoss, LossSpec
from .functional import (
    contrastive_loss,
    dkd_loss,
    kd_loss,
    standardize,
    tdl_loss,
    topkd_loss,
    tsm,
)
from .modules import TSM, ContrastiveLoss, DKDLoss, KDLoss, TDLLoss, TopKDLoss

__all__ = [
    "BASES",
    "METHODS",
    "TSM",
    "ContrastiveLoss",
    "DKDLoss",
    "DistillationLoss",
    "KDLoss",
    "LossSpec",
    "TDLLoss",
    "TopKDLoss",
    "contrastive_loss",
    "dkd_loss",
    "kd_loss",
    "standardize",
    "tdl_loss",
    "topkd_loss",
    "tsm",
]
