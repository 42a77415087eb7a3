"""SP (Tung & Mori, ICCV 2019): similarity-preserving KD on the last stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as TF
from torch import Tensor

from ._feat import check_pair, feature_inputs, zero_loss
from .base import Batch, Method
from .params import MethodParams, param
from .registry import register_method

__all__ = ["SP", "SPParams", "sp_loss"]


def _gram(f: Tensor) -> Tensor:
    f = f.reshape(f.shape[0], -1)
    return TF.normalize(f @ f.t())


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    r"""Similarity-preserving loss of one stage.

    .. math::
        L = \frac{1}{B^2} \lVert \tilde G_t - \tilde G_s \rVert_F^2,\qquad
        \tilde G = \operatorname{rownormalize}(F F^\top),\ F = f \text{ as } (B, C H W)

    Args:
        f_s: student features ``(B, ...)``.
        f_t: teacher features ``(B, ...)``; no gradient flows into them. Shapes may differ
            except for ``B``.

    Returns:
        A scalar, as mdistiller ``mdistiller/distillers/SP.py`` (``similarity_loss``, which
        returns it as a 1-element tensor).
    """
    check_pair("sp_loss", f_s, f_t, dim=None)
    b = f_s.shape[0]
    diff = _gram(f_t.detach()) - _gram(f_s)
    return (diff * diff).sum() / (b * b)


@dataclass(frozen=True)
class SPParams(MethodParams):
    ce: float = param(1.0, "weight of cross-entropy", check="nonneg")
    feat_weight: float = param(3000.0, "weight of the similarity-preserving loss", check="pos")


@register_method("sp")
class SP(Method):
    r"""Similarity-preserving KD: ``ce * CE + feat_weight * |G~_t - G~_s|_F^2 / B^2``.

    On the last stage output ``feats[-1]`` of each network (see :func:`sp_loss`); the ``B x B``
    Gram matrices make any pair comparable. CIFAR-100 reference (mdistiller ``cfg.py`` SP):
    ce 1, feat_weight 3000.
    """

    Params = SPParams
    paper = "Tung & Mori, 'Similarity-Preserving Knowledge Distillation', ICCV 2019"
    code = "megvii-research/mdistiller: mdistiller/distillers/SP.py"
    student_taps = ("feats",)
    teacher_taps = ("feats",)

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        io = feature_inputs(self.name, batch, ("feats",), p.ignore_index)
        if io is None:
            return zero_loss(batch)
        s, t = io
        loss = sp_loss(s["feats"][-1], t["feats"][-1])
        terms["sp"] = loss
        return p.feat_weight * loss
