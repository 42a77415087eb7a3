"""Distillation losses for PyTorch.

* Functional API (the public contract in ``docs/spec.md``): :func:`kd_loss`, :func:`dkd_loss`,
  :func:`standardize`, :func:`tsm`, :func:`tdl_loss`, :func:`contrastive_loss`,
  :func:`topkd_loss`.
* Module front-ends: :class:`KDLoss`, :class:`DKDLoss`, :class:`TSM`, :class:`TDLLoss`,
  :class:`ContrastiveLoss`, :class:`TopKDLoss`.

This is the math layer: cross-entropy weights, warm-up and the composition of terms into a
training objective belong to the methods (:mod:`topkd.methods`). Depends on torch only.
See ``docs/losses.md``.
"""

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
    "TSM",
    "ContrastiveLoss",
    "DKDLoss",
    "KDLoss",
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
