"""RKD (Park et al., CVPR 2019): relational KD, distance and angle terms on the embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import Tensor

from ._feat import check_pair, feature_inputs, zero_loss
from .base import Batch, Method
from .params import MethodParams, ParamError, param
from .registry import register_method

__all__ = ["RKD", "RKDParams", "pairwise_distances", "rkd_loss"]


def pairwise_distances(e: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    r"""``(B, D) -> (B, B)`` Euclidean distances, zero diagonal (mdistiller's ``_pdist``).

    Squared distances ``|e_i|^2 + |e_j|^2 - 2 e_i.e_j`` are clamped at ``eps`` before the square
    root (``squared=False``), then the diagonal is set to 0.
    """
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (e @ e.t())).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def _mean_positive(d: Tensor) -> Tensor:
    # d[d > 0].mean() without a data-dependent shape (no host sync)
    return d.sum() / (d > 0).sum()


def _angles(e: Tensor) -> Tensor:
    # cos of the angle at e_i between e_j and e_k, for all (i, j, k): (B*B*B,)
    diff = TF.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_loss(f_s: Tensor, f_t: Tensor, squared: bool = False, eps: float = 1e-12,
             distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    r"""Relational KD: ``distance_weight * L_d + angle_weight * L_a``.

    .. math::
        L_d = \operatorname{smoothL1}\Big(\frac{d(s)}{\bar d(s)}, \frac{d(t)}{\bar d(t)}\Big),
        \qquad L_a = \operatorname{smoothL1}\big(\cos\angle(s), \cos\angle(t)\big)

    ``d`` are the pairwise distances (:func:`pairwise_distances`), ``\bar d`` their mean over
    the positive entries (the off-diagonal ones), ``\cos\angle_{ijk}`` the cosine at ``e_i``
    between ``e_j - e_i`` and ``e_k - e_i`` over all ``B^3`` triples (0 when two indices
    coincide); smooth L1 with beta 1, mean over entries.

    Args:
        f_s: student embeddings ``(B, ...)`` (flattened to ``(B, D_s)``), ``B >= 2``.
        f_t: teacher embeddings ``(B, ...)``; no gradient flows into them. ``D_t`` may differ.
        squared, eps: distances without square root; the clamp of squared distances.

    Returns:
        A scalar, as mdistiller ``mdistiller/distillers/RKD.py`` (``rkd_loss``).
        Memory: ``B^2 D`` per network for the angle term (``B^3`` cosines).
    """
    check_pair("rkd_loss", f_s, f_t, dim=None)
    if f_s.shape[0] < 2:
        raise ValueError(f"rkd_loss: needs a batch of at least 2 samples (pairwise distances), "
                         f"got {f_s.shape[0]}")
    stu = f_s.reshape(f_s.shape[0], -1)
    tea = f_t.detach().reshape(f_t.shape[0], -1)
    loss = stu.new_zeros(())
    if distance_weight:
        t_d = pairwise_distances(tea, squared, eps)
        t_d = t_d / _mean_positive(t_d)
        d = pairwise_distances(stu, squared, eps)
        d = d / _mean_positive(d)
        loss = loss + distance_weight * TF.smooth_l1_loss(d, t_d)
    if angle_weight:
        loss = loss + angle_weight * TF.smooth_l1_loss(_angles(stu), _angles(tea))
    return loss


_DIST = (lambda p: p.distance_weight > 0, "distance_weight > 0")


@dataclass(frozen=True)
class RKDParams(MethodParams):
    ce: float = param(1.0, "weight of cross-entropy", check="nonneg")
    feat_weight: float = param(1.0, "weight of the RKD loss", check="pos")
    distance_weight: float = param(25.0, "weight of the distance term", check="nonneg")
    angle_weight: float = param(50.0, "weight of the angle term", check="nonneg")
    squared: bool = param(False, "squared distances (no square root)", when=_DIST)
    eps: float = param(1e-12, "clamp of the squared pairwise distances", check="pos",
                       when=_DIST)

    def _validate(self) -> None:
        if self.distance_weight == 0 and self.angle_weight == 0:
            raise ParamError("method.distance_weight and method.angle_weight are both 0: RKD "
                             "would be 0")


@register_method("rkd")
class RKD(Method):
    r"""Relational KD on the pooled embeddings:
    ``ce * CE + feat_weight * (distance_weight * L_d + angle_weight * L_a)``.

    See :func:`rkd_loss`; student and teacher ``pooled_feat`` (the classifiers' inputs), so any
    pair is supported. A batch (after dropping ``ignore_index`` rows) of fewer than 2 samples
    has no pair and contributes 0 (the reference gives NaN). CIFAR-100 reference (mdistiller
    ``cfg.py`` RKD): ce 1, feat_weight 1, distance 25, angle 50, eps 1e-12, not squared.
    """

    Params = RKDParams
    paper = "Park et al., 'Relational Knowledge Distillation', CVPR 2019"
    code = "megvii-research/mdistiller: mdistiller/distillers/RKD.py"
    student_taps = ("pooled_feat",)
    teacher_taps = ("pooled_feat",)

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        io = feature_inputs(self.name, batch, ("pooled_feat",), p.ignore_index)
        if io is None:
            return zero_loss(batch)
        s, t = io
        if s["pooled_feat"].shape[0] < 2:  # no pair to relate (e.g. a last batch of 1 sample)
            return zero_loss(batch)
        loss = rkd_loss(s["pooled_feat"], t["pooled_feat"], p.squared, p.eps,
                        p.distance_weight, p.angle_weight)
        terms["rkd"] = loss
        return p.feat_weight * loss
