"""VID (Ahn et al., CVPR 2019): variational information distillation on every stage."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from ._feat import check_pair, feature_inputs, pool_to_common, zero_loss
from .base import Batch, Method, MethodContext
from .params import MethodParams, param
from .registry import register_method

__all__ = ["VID", "VIDParams", "vid_loss", "vid_regressor"]


def vid_regressor(c_s: int, c_t: int) -> nn.Sequential:
    """mdistiller's VID regressor: three bias-free 1x1 convs ``c_s -> c_t -> c_t -> c_t`` with
    ReLUs between them (default PyTorch initialisation)."""
    def conv1x1(i: int, o: int) -> nn.Conv2d:
        return nn.Conv2d(i, o, kernel_size=1, padding=0, bias=False)

    return nn.Sequential(conv1x1(c_s, c_t), nn.ReLU(), conv1x1(c_t, c_t), nn.ReLU(),
                         conv1x1(c_t, c_t))


def vid_loss(f_s: Tensor, f_t: Tensor, regressor: nn.Module, log_scale: Tensor,
             eps: float = 1e-5) -> Tensor:
    r"""VID's Gaussian negative log-likelihood of the teacher stage given the student stage.

    .. math::
        L = \operatorname{mean}_{b, c, h, w} \frac12\Big(\frac{(\mu(s)_{bchw} - t_{bchw})^2}
            {\sigma^2_c} + \log \sigma^2_c\Big),\qquad
        \sigma^2_c = \log(1 + e^{\alpha_c}) + \epsilon

    Args:
        f_s: student stage ``(B, C_s, H, W)``.
        f_t: teacher stage ``(B, C_t, H', W')``; no gradient flows into it. Where
            ``H != H'`` the larger map is average-pooled to the smaller size first (before the
            regressor).
        regressor: ``\mu``, mapping ``C_s`` to ``C_t`` channels (:func:`vid_regressor`).
        log_scale: ``\alpha``, ``(C_t,)``.
        eps: the variance floor ``\epsilon``.

    Returns:
        A scalar, as mdistiller ``mdistiller/distillers/VID.py`` (``vid_loss``; ``softplus``
        is its ``log(1 + exp(.))``).
    """
    check_pair("vid_loss", f_s, f_t, 4)
    f_s, f_t = pool_to_common(f_s, f_t.detach())
    mean = regressor(f_s)
    if log_scale.shape != (mean.shape[1],):
        raise ValueError(f"vid_loss: log_scale must have shape ({mean.shape[1]},), got "
                         f"{tuple(log_scale.shape)}")
    var = (TF.softplus(log_scale) + eps).to(mean).view(1, -1, 1, 1)
    return torch.mean(0.5 * ((mean - f_t).pow(2) / var + torch.log(var)))


_TRAINED = (lambda p: p.train_variance, "train_variance is true (a fixed variance equals "
            "init_pred_var whatever eps is)")


@dataclass(frozen=True)
class VIDParams(MethodParams):
    ce: float = param(1.0, "weight of cross-entropy", check="nonneg")
    feat_weight: float = param(1.0, "weight of the VID loss", check="pos")
    init_pred_var: float = param(5.0, "initial variance sigma^2 of every teacher channel",
                                 check="pos")
    eps: float = param(1e-5, "variance floor: sigma^2 = softplus(alpha) + eps", check="pos",
                       when=_TRAINED)
    train_variance: bool = param(False, "optimise the variances (the reference never does: "
                                        "they stay at init_pred_var)")

    def _validate(self) -> None:
        from .params import ParamError

        if self.init_pred_var <= self.eps:
            raise ParamError(f"method.init_pred_var={self.init_pred_var} must exceed "
                             f"method.eps={self.eps} (sigma^2 = softplus(alpha) + eps)")


@register_method("vid")
class VID(Method):
    r"""Variational information distillation:
    ``ce * CE + feat_weight * sum_i NLL(t_i | mu_i(s_i), sigma_i^2)``.

    Over the stage outputs ``feats[1:]`` paired in order (see :func:`vid_loss`), one regressor
    :func:`vid_regressor` per stage pair (sized from the models' channel counts through
    ``ctx``) and one per-channel variance ``softplus(alpha) + eps`` initialised to
    ``init_pred_var``.

    Reference quirk, reproduced by default: mdistiller keeps the ``alpha`` in a Python list, so
    they are neither registered, saved, nor optimised: the variances stay at ``init_pred_var``
    for the whole run. ``train_variance: true`` optimises them as the paper does (they are then
    checkpointed parameters). CIFAR-100 reference (mdistiller ``cfg.py`` VID): ce 1,
    feat_weight 1, init_pred_var 5, eps 1e-5.
    """

    Params = VIDParams
    paper = ("Ahn et al., 'Variational Information Distillation for Knowledge Transfer', "
             "CVPR 2019")
    code = "megvii-research/mdistiller: mdistiller/distillers/VID.py"
    student_taps = ("feats",)
    teacher_taps = ("feats",)
    trainable_modules = True

    def __init__(self, params: VIDParams | None = None,
                 ctx: MethodContext | None = None) -> None:
        super().__init__(params, ctx)
        if ctx is None:
            raise ValueError("vid: its regressors are sized from the models' feature shapes; "
                             "build it with a MethodContext (student, teacher, input_size)")
        s = ctx.feature_shapes("student", ("feats",))["feats"][1:]
        t = ctx.feature_shapes("teacher", ("feats",))["feats"][1:]
        if not s or not t:
            raise ValueError(f"vid: needs at least one stage after the stem in both models, got "
                             f"{len(s)} (student) and {len(t)} (teacher)")
        if len(s) > len(t):  # mdistiller indexes its regressors by the student's stages
            raise ValueError(f"vid: the student has {len(s)} stages after the stem and the "
                             f"teacher {len(t)}; VID pairs every student stage with a teacher "
                             "stage (as mdistiller), so the teacher needs at least as many")
        p = self.params
        self.regressors = nn.ModuleList(vid_regressor(a[0], b[0]) for a, b in zip(s, t))
        # As mdistiller: alpha = log(exp(init_pred_var - eps) - 1) in float64, stored as float32.
        alpha = math.log(math.exp(p.init_pred_var - p.eps) - 1.0)
        self.log_scales = nn.ParameterList(
            nn.Parameter(torch.full((b[0],), alpha), requires_grad=p.train_variance)
            for b in t[:len(s)])

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        io = feature_inputs(self.name, batch, ("feats",), p.ignore_index)
        if io is None:
            return zero_loss(batch)
        s, t = io
        g_s, g_t = s["feats"][1:], t["feats"][1:]
        if len(g_s) != len(self.regressors) or len(g_t) < len(g_s):
            raise ValueError(f"vid: built for {len(self.regressors)} student stages, got "
                             f"{len(g_s)} student and {len(g_t)} teacher stages")
        loss = None
        for f_s, f_t, reg, alpha in zip(g_s, g_t, self.regressors, self.log_scales):
            term = vid_loss(f_s, f_t, reg, alpha, p.eps)
            loss = term if loss is None else loss + term
        terms["vid"] = loss
        return p.feat_weight * loss
