"""KD (Hinton et al. 2015), with optional LS, TSM and an added TDL term."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from topkd.losses import functional as F
from topkd.losses._validate import reduce_rows

from ._logit import TDLParams, TSMParams, logit_rows, teacher_target
from .base import Batch, Method
from .params import MethodParams, param
from .registry import register_method

_TOPK = (lambda p: p.tsm is not None or p.tdl is not None, "tsm or tdl is set")


@dataclass(frozen=True)
class KDParams(MethodParams):
    ce: float = param(0.1, "weight of cross-entropy", check="nonneg")
    kd_weight: float = param(0.9, "weight of the KD term", check="pos")
    temperature: float = param(4.0, "softmax temperature T", check="pos")
    ls: bool = param(False, "logit standardization of both logits before every distillation "
                            "term (Sun et al., CVPR 2024)")
    k: int = param(5, "top-k size of TSM and TDL", check="int1", when=_TOPK)
    tsm: TSMParams | None = param(None, "TSM as the teacher transform (null = off)")
    tdl: TDLParams | None = param(None, "an added TDL term on the (TSM) teacher (null = off)")


@register_method("kd")
class KD(Method):
    r"""Knowledge distillation:
    ``ce * CE + warm * (kd_weight * T^2 KL(p_t^T || p_s^T) [+ tdl.weight * TDL])``.

    KL summed over classes, mean over the batch, times ``T^2`` (mdistiller's ``kd_loss``).
    ``ls``: both logits are standardized (CE keeps the raw student logits, as the LS code).
    ``tsm``: the teacher logits are replaced by ``tsm(t)`` for KD and TDL. CIFAR-100 reference:
    T 4, ce 0.1, kd 0.9 (mdistiller ``configs/cifar100/kd.yaml``); LS: T 2, kd 9.
    """

    Params = KDParams
    paper = "Hinton et al., 'Distilling the Knowledge in a Neural Network', 2015"
    code = "megvii-research/mdistiller: mdistiller/distillers/KD.py"

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        r = logit_rows(self.name, batch.student.logits, batch.teacher.logits, batch.labels,
                       p.ignore_index, self.validate)
        s, t = (F.standardize(r.s), F.standardize(r.t)) if p.ls else (r.s, r.t)
        b = teacher_target(self.name, t, r.y, p.k, p.tsm, p.ignore_index, terms, r.keep)
        kd = reduce_rows(F.kd_loss(s, b, p.temperature, "none", validate=False), r.keep,
                         r.lead, "mean")
        terms["kd"] = kd
        loss = p.kd_weight * kd
        if p.tdl is not None:
            terms["tdl"] = F.tdl_loss(s, b, p.k, p.tdl.alpha, p.tdl.beta, y=r.y,
                                      ignore_index=p.ignore_index, validate=False)
            loss = loss + p.tdl.weight * terms["tdl"]
        return loss
