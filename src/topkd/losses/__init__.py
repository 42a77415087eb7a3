"""Distillation losses: functional API (``/shared/method.md``), modules and the criterion."""

from .functional import (
    contrastive_loss,
    dkd_loss,
    kd_loss,
    standardize,
    tdl_loss,
    topkd_loss,
    tsm,
)

__all__ = [
    "contrastive_loss",
    "dkd_loss",
    "kd_loss",
    "standardize",
    "tdl_loss",
    "topkd_loss",
    "tsm",
]
