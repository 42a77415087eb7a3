"""Shared pieces of the feature methods (FitNet, AT, RKD, PKT, SP, NST, KDSVD, VID).

* :func:`feature_inputs`: the requested taps of student and teacher, checked, half precision
  upcast, and with the rows whose label is ``ignore_index`` dropped (every term drops them);
* :func:`pool_to_common`: mdistiller's rule for comparing two stages of different spatial size
  (AT, NST, VID): the larger map is average-pooled to the smaller one's size;
* :func:`check_pair`: the batch and rank checks every pair of compared features needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor

from ._feature import compute_feats
from .base import Batch, ModelOutput

__all__ = ["as_float", "check_pair", "feature_inputs", "pool_to_common", "stage_pairs",
           "zero_loss"]


def _tap(fn: str, which: str, out: ModelOutput, kind: str) -> Any:
    if kind not in out.feats:
        raise ValueError(f"{fn}: the {which}'s {kind!r} features are missing (the method "
                         f"declares the tap; got {sorted(out.feats) or 'none'})")
    return compute_feats(out.feats[kind])


def _rows(v: Any, keep: Tensor) -> Any:
    return [f[keep] for f in v] if isinstance(v, list) else v[keep]


def feature_inputs(fn: str, batch: Batch, kinds: Sequence[str], ignore_index: int | None,
                   ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``({kind: student value}, {kind: teacher value})`` of one batch.

    List kinds (``feats``, ``preact_feats``) are lists of ``(B, C, H, W)`` tensors,
    ``pooled_feat`` is ``(B, D)``; float16/bfloat16 features are upcast to float32 (the losses
    use norms, SVDs and logs). With ``ignore_index`` set, rows with that (integer) label are
    dropped; ``None`` is returned when no row is left (the caller returns :func:`zero_loss`).
    """
    if batch.teacher is None:
        raise ValueError(f"{fn}: teacher outputs are required")
    s = {k: _tap(fn, "student", batch.student, k) for k in kinds}
    t = {k: _tap(fn, "teacher", batch.teacher, k) for k in kinds}
    y = batch.labels
    if ignore_index is not None and not y.is_floating_point():
        keep = y.reshape(-1) != ignore_index
        if not bool(keep.all()):  # one host sync, only when ignore_index is set
            if not bool(keep.any()):
                return None
            s = {k: _rows(v, keep) for k, v in s.items()}
            t = {k: _rows(v, keep) for k, v in t.items()}
    return s, t


def zero_loss(batch: Batch) -> Tensor:
    """A 0 that stays attached to the student's graph (a batch whose rows are all ignored)."""
    return batch.student.logits.sum() * 0.0


def check_pair(fn: str, f_s: Tensor, f_t: Tensor, dim: int | None = 4, what: str = "") -> None:
    """Same batch size, and ``dim`` dimensions (``None``: any) for student and teacher."""
    where = f" {what}" if what else ""
    for name, f in (("student", f_s), ("teacher", f_t)):
        if not isinstance(f, Tensor) or not f.is_floating_point():
            raise ValueError(f"{fn}: {name} features{where} must be a floating-point tensor")
        if dim is not None and f.dim() != dim:
            shape = "(B, C, H, W)" if dim == 4 else "(B, D)" if dim == 2 else f"{dim}-d"
            raise ValueError(f"{fn}: {name} features{where} must have shape {shape}, got "
                             f"{tuple(f.shape)}")
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"{fn}: student and teacher features{where} have different batch sizes "
                         f"{f_s.shape[0]} and {f_t.shape[0]}")


def pool_to_common(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two ``(B, C, H, W)`` maps to the smaller one's ``(H, W)``.

    mdistiller's AT, NST and VID compare only ``H`` and pool to ``(H_small, H_small)`` (square
    maps); pooling each side to ``(min H, min W)`` is the same on square maps and also defined on
    non-square ones (where the reference fails).
    """
    h, w = min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3])
    if f_s.shape[2:] != (h, w):
        f_s = TF.adaptive_avg_pool2d(f_s, (h, w))
    if f_t.shape[2:] != (h, w):
        f_t = TF.adaptive_avg_pool2d(f_t, (h, w))
    return f_s, f_t


def stage_pairs(fn: str, g_s: Sequence[Tensor], g_t: Sequence[Tensor]
                ) -> list[tuple[Tensor, Tensor]]:
    """``zip(g_s, g_t)`` as mdistiller pairs stages (the deeper list's extra stages are unused),
    with the checks of :func:`check_pair` on every pair."""
    if not g_s or not g_t:
        raise ValueError(f"{fn}: needs at least one stage of student and teacher features, got "
                         f"{len(g_s)} and {len(g_t)}")
    pairs = list(zip(g_s, g_t))
    for i, (f_s, f_t) in enumerate(pairs):
        check_pair(fn, f_s, f_t, 4, f"of stage {i}")
    return pairs


def as_float(x: Tensor) -> Tensor:
    """At least float32 (mdistiller's ``.float()``, without lowering float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
