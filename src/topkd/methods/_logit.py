"""Shared pieces of the logit methods: TSM/TDL sections, LS, and row preparation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from topkd.losses import functional as F
from topkd.losses._validate import as_compute, check_k, prepare

from .params import Params, param

__all__ = ["LogitRows", "TDLParams", "TSMParams", "logit_rows", "teacher_target"]


@dataclass(frozen=True)
class TSMParams(Params):
    """TopKD's Top-K Scaling Module as the teacher transform (see ``docs/spec.md``)."""

    _where = "method.tsm"

    gamma: float = param(1.0, "rank amplification of the teacher's top-k logits", check="nonneg")
    lam: float = param(0.5, "strength of the top-k bias delta", check="nonneg")
    correct_gt: bool = param(True, "raise the ground-truth logit to the top when the teacher "
                                   "is wrong")
    schedule: Literal["linear", "constant"] = param("linear", "rank-weight schedule")


@dataclass(frozen=True)
class TDLParams(Params):
    """An added Top-K Decoupled Loss term on the (TSM) teacher target."""

    _where = "method.tdl"

    weight: float = param(1.0, "weight of the TDL term", check="pos")
    alpha: float = param(1.0, "weight of the positive top-k cosine", check="nonneg")
    beta: float = param(0.5, "weight of the negative top-k cosine", check="nonneg")


class LogitRows(NamedTuple):
    """Flattened ``(N, C)`` float32 student/teacher rows, labels (ignored rows restored to the
    ignore marker), the kept-row mask and the leading shape."""

    s: Tensor
    t: Tensor
    y: Tensor
    keep: Tensor | None
    lead: torch.Size


def logit_rows(fn: str, s: Tensor, t: Tensor, y: Tensor, ignore_index: int | None,
               validate: bool) -> LogitRows:
    rows = prepare(fn, s, t, y, ignore_index=ignore_index, need_labels=True, validate=validate)
    yy = torch.where(rows.keep, rows.y, ignore_index) if rows.keep is not None else rows.y
    return LogitRows(as_compute(rows.s), as_compute(rows.t), yy, rows.keep, rows.lead)


def teacher_target(fn: str, t: Tensor, y: Tensor, k: int, tsm: TSMParams | None,
                   ignore_index: int | None, terms: dict[str, Tensor],
                   keep: Tensor | None) -> Tensor:
    """``tsm(t)`` when the section is on (recording ``terms["tsm_corrected"]``), else ``t``."""
    if tsm is None:
        return t
    check_k(fn, k, t.shape[-1], two_sided=False)
    b, corrected = F.tsm(t, y, k, tsm.gamma, tsm.lam, tsm.correct_gt, tsm.schedule,
                         ignore_index=ignore_index, return_stats=True, validate=False)
    n = keep.sum().clamp_min(1) if keep is not None else max(corrected.numel(), 1)
    terms["tsm_corrected"] = corrected.sum() / n
    return b
