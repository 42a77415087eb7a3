"""Thin ``nn.Module`` front-ends of the functional losses (no parameters, no state)."""

from __future__ import annotations

from torch import Tensor, nn

from . import functional as F
from ._validate import (
    check_k_int,
    check_nonneg,
    check_positive,
    check_reduction,
    check_schedule,
    check_weights,
)

__all__ = ["KDLoss", "DKDLoss", "TSM", "TDLLoss", "ContrastiveLoss", "TopKDLoss"]


class KDLoss(nn.Module):
    """:func:`topkd.losses.kd_loss` as a module: ``forward(s, t)``."""

    def __init__(self, temperature: float = 4.0, reduction: str = "mean") -> None:
        super().__init__()
        check_positive("KDLoss", "temperature", temperature)
        check_reduction("KDLoss", reduction)
        self.temperature, self.reduction = temperature, reduction

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        return F.kd_loss(s, t, self.temperature, self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


class DKDLoss(nn.Module):
    """:func:`topkd.losses.dkd_loss` as a module: ``forward(s, t, y)`` (no CE, no warm-up)."""

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        reduction: str = "mean",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        check_positive("DKDLoss", "temperature", temperature)
        check_weights("DKDLoss", alpha=alpha, beta=beta)
        check_reduction("DKDLoss", reduction)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, s: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return F.dkd_loss(
            s, t, y, self.alpha, self.beta, self.temperature, self.reduction,
            ignore_index=self.ignore_index,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"


class TSM(nn.Module):
    """:func:`topkd.losses.tsm` as a module: ``forward(t, y) -> u'`` (teacher transform)."""

    def __init__(
        self,
        k: int = 5,
        gamma: float = 1.0,
        lam: float = 0.5,
        correct_gt: bool = True,
        schedule: str = "linear",
        ignore_index: int | None = None,
        return_stats: bool = False,
    ) -> None:
        super().__init__()
        check_k_int("TSM", k)
        check_nonneg("TSM", "gamma", gamma)
        check_nonneg("TSM", "lam", lam)
        check_schedule("TSM", schedule)
        self.k, self.gamma, self.lam = k, gamma, lam
        self.correct_gt, self.schedule = correct_gt, schedule
        self.ignore_index, self.return_stats = ignore_index, return_stats

    def forward(self, t: Tensor, y: Tensor):
        return F.tsm(
            t, y, self.k, self.gamma, self.lam, self.correct_gt, self.schedule,
            ignore_index=self.ignore_index, return_stats=self.return_stats,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, gamma={self.gamma}, lam={self.lam}, correct_gt={self.correct_gt}, "
            f"schedule={self.schedule!r}"
        )


class TDLLoss(nn.Module):
    """:func:`topkd.losses.tdl_loss` as a module: ``forward(s, b)``."""

    def __init__(
        self, k: int = 5, alpha: float = 1.0, beta: float = 0.5, reduction: str = "mean"
    ) -> None:
        super().__init__()
        check_k_int("TDLLoss", k)
        check_weights("TDLLoss", alpha=alpha, beta=beta)
        check_reduction("TDLLoss", reduction)
        self.k, self.alpha, self.beta, self.reduction = k, alpha, beta, reduction

    def forward(self, s: Tensor, b: Tensor) -> Tensor:
        return F.tdl_loss(s, b, self.k, self.alpha, self.beta, self.reduction)

    def extra_repr(self) -> str:
        return f"k={self.k}, alpha={self.alpha}, beta={self.beta}"


class ContrastiveLoss(nn.Module):
    """:func:`topkd.losses.contrastive_loss` as a module: ``forward(s, b)``."""

    def __init__(self, tau: float = 0.1) -> None:
        super().__init__()
        check_positive("ContrastiveLoss", "tau", tau)
        self.tau = tau

    def forward(self, s: Tensor, b: Tensor) -> Tensor:
        return F.contrastive_loss(s, b, self.tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class TopKDLoss(nn.Module):
    """:func:`topkd.losses.topkd_loss` as a module: ``forward(s, t, y)`` (no CE, no warm-up)."""

    def __init__(
        self,
        k: int = 5,
        w_con: float = 1.0,
        w_tdl: float = 1.0,
        tau: float = 0.1,
        alpha: float = 1.0,
        beta: float = 0.5,
        gamma: float = 1.0,
        lam: float = 0.5,
        correct_gt: bool = True,
        use_tsm: bool = True,
        schedule: str = "linear",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        check_k_int("TopKDLoss", k)
        check_positive("TopKDLoss", "tau", tau)
        check_weights("TopKDLoss", w_con=w_con, w_tdl=w_tdl, alpha=alpha, beta=beta)
        check_schedule("TopKDLoss", schedule)
        self.kw = dict(
            k=k, w_con=w_con, w_tdl=w_tdl, tau=tau, alpha=alpha, beta=beta, gamma=gamma,
            lam=lam, correct_gt=correct_gt, use_tsm=use_tsm, schedule=schedule,
            ignore_index=ignore_index,
        )  # fmt: skip

    def forward(self, s: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return F.topkd_loss(s, t, y, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())
