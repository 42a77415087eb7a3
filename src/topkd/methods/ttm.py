"""TTM and WTTM (Zheng & Yang, ICLR 2024): KD against a power-transformed teacher, student at T=1.

Two registered methods share one loss, :func:`ttm_loss`: ``ttm`` (every sample weighted 1) and
``wttm`` (each sample weighted by the power sum of its teacher distribution). Each has its own
reference defaults, so neither carries a switch that would make the other's parameters
meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as TF
from torch import Tensor

from topkd.losses._validate import (
    as_compute,
    check_positive,
    check_reduction,
    prepare,
    reduce_rows,
)
from topkd.losses.functional import autocast_off

from ._logit import logit_rows
from .base import Batch, Method
from .params import MethodParams, param
from .registry import register_method

__all__ = ["TTM", "TTMParams", "WTTM", "WTTMParams", "ttm_loss"]


def _ttm_rows(s: Tensor, t: Tensor, gamma: float, weighted: bool) -> Tensor:
    """Per-row (W)TTM of ``(N, C)`` float rows; see :func:`ttm_loss`."""
    a = gamma * TF.log_softmax(t, -1)          # log p_t^gamma
    log_norm = torch.logsumexp(a, -1, keepdim=True)  # log sum_c p_t^gamma (power sum)
    log_q = a - log_norm                       # log of the transformed teacher
    kl = (log_q.exp() * (log_q - TF.log_softmax(s, -1))).sum(-1)
    return kl * log_norm.squeeze(-1).exp() if weighted else kl


@autocast_off
def ttm_loss(s: Tensor, t: Tensor, gamma: float = 0.1, weighted: bool = False,
             reduction: str = "mean", *, validate: bool = True) -> Tensor:
    r"""Transformed teacher matching (TTM) and its sample-weighted form (WTTM).

    .. math::
        \tilde p^t_b = \frac{(p^t_b)^\gamma}{\sum_c (p^t_{bc})^\gamma}
                     = \mathrm{softmax}(\gamma z^t_b),\qquad
        \ell_b = w_b\, \mathrm{KL}\big(\tilde p^t_b \,\|\, \mathrm{softmax}(z^s_b)\big)

    with ``p^t = softmax(z^t)``; the student is not tempered (no ``T^2`` factor either).
    TTM: ``w_b = 1``. WTTM: ``w_b = U_gamma(p^t_b) = sum_c (p^t_bc)^gamma``, the power sum of
    the teacher distribution (``= exp((1 - gamma) H_gamma(p^t_b))`` with ``H_gamma`` its Rényi
    entropy of order ``gamma``): flatter teacher outputs weigh more. Batch mean. This is
    zkxufo/TTM ``distiller_zoo/ttm.py`` / ``wttm.py`` (its weight is the un-normalised power sum,
    not rescaled over the batch).

    Computed in log space: ``p_t^gamma`` is ``exp(gamma * log_softmax(z^t))``, so a teacher
    probability that underflows to 0 in ``softmax`` (where the reference's
    ``softmax(z^t) ** gamma`` is exactly 0) still gets its tiny positive mass; the values agree
    otherwise (float64, 1e-6 in ``tests/test_method_ttm.py``).

    Args:
        s: student logits ``(B, C)`` or ``(..., C)``.
        t: teacher logits, same shape (detached inside).
        gamma: exponent of the power transform, ``> 0`` (``1/T`` of a teacher temperature; the
            reference's ``--ttm_l``).
        weighted: WTTM's per-sample weights.
        reduction: ``"mean"`` (scalar), ``"sum"`` or ``"none"`` (shape ``(...)``).
        validate: check for NaN/inf logits (one host sync).
    """
    fn = "ttm_loss"
    check_positive(fn, "gamma", gamma)
    check_reduction(fn, reduction)
    rows = prepare(fn, s, t, validate=validate)
    loss = _ttm_rows(as_compute(rows.s), as_compute(rows.t), float(gamma), bool(weighted))
    return reduce_rows(loss, None, rows.lead, reduction)


@dataclass(frozen=True)
class TTMParams(MethodParams):
    ce: float = param(1.0, "weight of cross-entropy (the reference's -r)", check="nonneg")
    beta: float = param(45.0, "weight of the TTM term (the reference's -b)", check="pos")
    gamma: float = param(0.1, "exponent of the teacher's power transform p_t^gamma (= 1/T; the "
                              "reference's --ttm_l)", check="pos")


@dataclass(frozen=True)
class WTTMParams(TTMParams):
    beta: float = param(4.0, "weight of the WTTM term (the reference's -b, or -a for an added "
                             "WTTM term)", check="pos")
    gamma: float = param(0.2, "exponent of the teacher's power transform p_t^gamma (= 1/T; the "
                              "reference's --ttm_l)", check="pos")


class _TransformedTeacher(Method):
    weighted: ClassVar[bool] = False
    paper = ("Zheng & Yang, 'Knowledge Distillation Based on Transformed Teacher Matching', "
             "ICLR 2024")

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        r = logit_rows(self.name, batch.student.logits, batch.teacher.logits, batch.labels,
                       p.ignore_index, self.validate)
        loss = reduce_rows(_ttm_rows(r.s, r.t, p.gamma, self.weighted), r.keep, r.lead, "mean")
        terms[self.name] = loss
        return p.beta * loss


@register_method("ttm")
class TTM(_TransformedTeacher):
    r"""Transformed teacher matching: ``ce * CE + warm * beta * KL(softmax(gamma t) || p_s)``.

    KD without the student temperature: the teacher is power-transformed
    (``p_t^gamma / sum p_t^gamma``, i.e. tempered at ``T = 1/gamma``), the student is not, and
    there is no ``T^2`` factor; batch mean (:func:`ttm_loss`). CIFAR-100 reference: the
    repository's README command (VGG13 -> VGG8): gamma 0.1, beta 45, ce 1; the solver is the
    CRD/RepDistiller one (240 epochs, lr 0.05, 0.01 for light students).
    """

    Params = TTMParams
    code = "zkxufo/TTM: distiller_zoo/ttm.py"


@register_method("wttm")
class WTTM(_TransformedTeacher):
    r"""Weighted TTM: ``ce * CE + warm * beta * mean_b U_gamma(p_t,b) KL(p~_t,b || p_s,b)``.

    As :class:`TTM` with each sample weighted by ``U_gamma(p_t) = sum_c p_t,c^gamma``, the power
    sum of its teacher distribution (not normalised over the batch, as the reference). CIFAR-100
    reference: the only WTTM setting the repository publishes (README, VGG13 -> VGG8, WTTM added
    to CRD): gamma 0.2, weight 4, ce 1.
    """

    Params = WTTMParams
    code = "zkxufo/TTM: distiller_zoo/wttm.py"
    weighted = True
