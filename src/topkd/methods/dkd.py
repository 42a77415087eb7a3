"""DKD (Zhao et al., CVPR 2022), with optional LS, TSM and an added TDL term."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from topkd.losses import functional as F

from ._logit import TDLParams, TSMParams, logit_rows, teacher_target
from .base import Batch, Method
from .params import MethodParams, ParamError, param
from .registry import register_method

_TOPK = (lambda p: p.tsm is not None or p.tdl is not None, "tsm or tdl is set")


@dataclass(frozen=True)
class DKDParams(MethodParams):
    ce: float = param(1.0, "weight of cross-entropy", check="nonneg")
    warmup: float = param(20.0, "epochs of linear warm-up of the distillation terms",
                          check="nonneg")
    alpha: float = param(1.0, "weight of TCKD (target-class KD)", check="nonneg")
    beta: float = param(8.0, "weight of NCKD (non-target-class KD)", check="nonneg")
    temperature: float = param(4.0, "softmax temperature T", check="pos")
    ls: bool = param(False, "logit standardization of both logits before every distillation "
                            "term (Sun et al., CVPR 2024)")
    k: int = param(5, "top-k size of TSM and TDL", check="int1", when=_TOPK)
    tsm: TSMParams | None = param(None, "TSM as the teacher transform (null = off)")
    tdl: TDLParams | None = param(None, "an added TDL term on the (TSM) teacher (null = off)")

    def _validate(self) -> None:
        if self.alpha == 0 and self.beta == 0:
            raise ParamError("method.alpha and method.beta are both 0: DKD would be 0 (and "
                             "its temperature without effect); use the kd or ce method")


@register_method("dkd")
class DKD(Method):
    r"""Decoupled KD: ``ce * CE + warm * (alpha * TCKD + beta * NCKD [+ tdl.weight * TDL])``.

    TCKD is the binary KL over ``[p_y, 1 - p_y]``, NCKD the KL over the non-target classes (target
    masked before the softmax), both at ``T`` times ``T^2``, batch mean (mdistiller's
    ``dkd_loss``); ``warm = min(epoch / warmup, 1)``. CIFAR-100 reference: ce 1, alpha 1, beta 8
    (per-pair exceptions in ``configs/``), T 4, warm-up 20. The LS code runs DKD+LS with T 2 and
    alpha, beta multiplied by its ``--kd-weight 9``.
    """

    Params = DKDParams
    paper = "Zhao et al., 'Decoupled Knowledge Distillation', CVPR 2022"
    code = "megvii-research/mdistiller: mdistiller/distillers/DKD.py"

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        r = logit_rows(self.name, batch.student.logits, batch.teacher.logits, batch.labels,
                       p.ignore_index, self.validate)
        s, t = (F.standardize(r.s), F.standardize(r.t)) if p.ls else (r.s, r.t)
        b = teacher_target(self.name, t, r.y, p.k, p.tsm, p.ignore_index, terms, r.keep)
        dkd = F.dkd_loss(s, b, r.y, p.alpha, p.beta, p.temperature,
                         ignore_index=p.ignore_index, validate=False)
        terms["dkd"] = dkd
        loss = dkd
        if p.tdl is not None:
            terms["tdl"] = F.tdl_loss(s, b, p.k, p.tdl.alpha, p.tdl.beta, y=r.y,
                                      ignore_index=p.ignore_index, validate=False)
            loss = loss + p.tdl.weight * terms["tdl"]
        return loss
