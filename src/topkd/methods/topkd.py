"""TopKD (Wang & Zhou 2025, arXiv 2508.04539): TSM + TDL + a contrastive term on logits."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from topkd.losses import functional as F

from ._logit import TSMParams
from .base import Batch, Method
from .params import MethodParams, ParamError, param
from .registry import register_method

_LS_NO_OP = (
    "logit standardization does not change TopKD: its TDL and contrastive terms are cosines of "
    "centered logits (invariant to a per-sample shift and scale) and TSM scales with its input, "
    "so LS only moves TSM's 1e-3 correction margin (docs/methods.md)")


@dataclass(frozen=True)
class TopKDParams(MethodParams):
    _rejected = {
        "ls": _LS_NO_OP,
        "temperature": "TopKD has no softmax temperature; its contrastive temperature is 'tau'",
    }

    ce: float = param(1.0, "weight of cross-entropy", check="nonneg")
    warmup: float = param(20.0, "epochs of linear warm-up of the distillation terms",
                          check="nonneg")
    k: int = param(5, "top-k size of TSM and TDL (1 <= k, 2k <= C)", check="int1",
                   when=(lambda p: p.w_tdl > 0 or p.tsm is not None, "w_tdl > 0 or tsm is set"))
    w_con: float = param(1.0, "weight of the batch contrastive term", check="nonneg")
    w_tdl: float = param(1.0, "weight of the Top-K Decoupled Loss", check="nonneg")
    tau: float = param(0.1, "temperature of the contrastive term", check="pos",
                       when=(lambda p: p.w_con > 0, "w_con > 0"))
    alpha: float = param(1.0, "TDL weight of the positive top-k cosine", check="nonneg",
                         when=(lambda p: p.w_tdl > 0, "w_tdl > 0"))
    beta: float = param(0.5, "TDL weight of the negative top-k cosine", check="nonneg",
                        when=(lambda p: p.w_tdl > 0, "w_tdl > 0"))
    tsm: TSMParams | None = param(TSMParams(), "TSM on the teacher target (null = raw teacher)")

    def _validate(self) -> None:
        if self.w_con == 0 and self.w_tdl == 0:
            raise ParamError("method.w_con and method.w_tdl are both 0: TopKD would be 0")


@register_method("topkd")
class TopKD(Method):
    r"""``ce * CE + warm * (w_con * L_con(s, b) + w_tdl * TDL(s, b))`` with ``b = tsm(t)``.

    See ``docs/spec.md`` for TSM, TDL and the contrastive term. CIFAR-100 defaults: ce 1, k 5,
    w_con 1, w_tdl 1, tau 0.1, TDL alpha 1 / beta 0.5, TSM gamma 1 / lam 0.5 with the
    ground-truth correction, warm-up 20 epochs.
    """

    Params = TopKDParams
    paper = "Wang & Zhou, 'Top-scaled Knowledge Distillation', arXiv 2508.04539, 2025"
    code = "this library (the paper's code is not public)"

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p, tsm = self.params, self.params.tsm
        on = tsm is not None
        con, tdl, corrected, rows = F._topkd_parts(
            batch.student.logits, batch.teacher.logits, batch.labels, k=p.k, tau=p.tau,
            alpha=p.alpha, beta=p.beta, gamma=tsm.gamma if on else 1.0,
            lam=tsm.lam if on else 0.5, correct_gt=tsm.correct_gt if on else True, use_tsm=on,
            schedule=tsm.schedule if on else "linear", ignore_index=p.ignore_index,
            validate=self.validate, need_con=p.w_con != 0, need_tdl=p.w_tdl != 0, fn=self.name)
        loss = p.w_con * con + p.w_tdl * tdl
        terms["topkd"] = loss
        terms["topkd_con"], terms["topkd_tdl"] = con, tdl
        if corrected is not None:
            n = rows.keep.sum().clamp_min(1) if rows.keep is not None else \
                max(corrected.numel(), 1)
            terms["tsm_corrected"] = corrected.sum() / n
        return loss
