"""FitNet (Romero et al., ICLR 2015): a regressed student stage matches a teacher stage (MSE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as TF
from torch import Tensor, nn

from ._feat import check_pair, feature_inputs, zero_loss
from .base import Batch, Method, MethodContext
from .params import MethodParams, param
from .registry import register_method

__all__ = ["ConvReg", "FitNet", "FitNetParams", "hint_loss"]


class ConvReg(nn.Module):
    """mdistiller's convolutional regressor (``_common.ConvReg``): conv -> BN [-> ReLU].

    Maps a student map ``(C_s, H_s, W_s)`` to the teacher's ``(C_t, H_t, W_t)``; the conv is
    chosen as the reference chooses it, from the heights:

    * ``H_s == 2 H_t``: 3x3 conv, stride 2, padding 1;
    * ``2 H_s == H_t``: 4x4 transposed conv, stride 2, padding 1;
    * ``H_s >= H_t``: conv with kernel ``(1 + H_s - H_t, 1 + W_s - W_t)`` (1x1 for equal sizes).

    Other sizes are a ``ValueError`` (mdistiller raises ``NotImplemented(...)``, itself a
    ``TypeError``). Default PyTorch initialisation, as the reference.
    """

    def __init__(self, s_shape: tuple[int, ...], t_shape: tuple[int, ...],
                 use_relu: bool = True) -> None:
        super().__init__()
        if len(s_shape) != 3 or len(t_shape) != 3:
            raise ValueError(f"ConvReg: shapes must be (C, H, W), got {s_shape} and {t_shape}")
        s_c, s_h, s_w = s_shape
        t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"ConvReg cannot map a student map of size {s_h}x{s_w} to a teacher "
                             f"map of size {t_h}x{t_w}: it needs H_s = 2 H_t, 2 H_s = H_t or "
                             "H_s >= H_t and W_s >= W_t (choose another hint layer)")
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


def hint_loss(f_s: Tensor, f_t: Tensor, regressor: nn.Module | None = None) -> Tensor:
    r"""FitNet's hint loss: ``mean((r(f_s) - f_t)^2)``.

    Args:
        f_s: student features, any shape ``(B, ...)`` (``(B, C_s, H_s, W_s)`` for a conv
            regressor).
        f_t: teacher features, the shape of ``r(f_s)``; no gradient flows into them.
        regressor: ``r`` (e.g. :class:`ConvReg`); ``None`` is the identity.

    Returns:
        A scalar: the mean over every element (``F.mse_loss``), as mdistiller's ``FitNet``
        (``mdistiller/distillers/FitNet.py``).
    """
    check_pair("hint_loss", f_s, f_t, dim=None)
    x = f_s if regressor is None else regressor(f_s)
    if x.shape != f_t.shape:
        raise ValueError(f"hint_loss: the regressed student features {tuple(x.shape)} do not "
                         f"match the teacher features {tuple(f_t.shape)}")
    return TF.mse_loss(x, f_t.detach())


@dataclass(frozen=True)
class FitNetParams(MethodParams):
    ce: float = param(1.0, "weight of cross-entropy", check="nonneg")
    feat_weight: float = param(100.0, "weight of the hint MSE", check="pos")
    hint_layer: int = param(2, "index in 'feats' of the hinted stage (0 = stem output)",
                            check="nonneg")


@register_method("fitnet")
class FitNet(Method):
    r"""FitNet: ``ce * CE + feat_weight * mean((ConvReg(s_h) - t_h)^2)``.

    ``s_h``/``t_h`` are student/teacher ``feats[hint_layer]``; :class:`ConvReg` (conv, BN, ReLU)
    is built from their shapes (one dummy forward of each model, through ``ctx``) and trained
    with the student. Single-stage training as mdistiller (the paper trains the hint first).
    CIFAR-100 reference (mdistiller ``cfg.py`` FITNET): ce 1, feat_weight 100, hint layer 2.
    """

    Params = FitNetParams
    paper = "Romero et al., 'FitNets: Hints for Thin Deep Nets', ICLR 2015"
    code = "megvii-research/mdistiller: mdistiller/distillers/FitNet.py"
    student_taps = ("feats",)
    teacher_taps = ("feats",)
    trainable_modules = True

    def __init__(self, params: FitNetParams | None = None,
                 ctx: MethodContext | None = None) -> None:
        super().__init__(params, ctx)
        if ctx is None:
            raise ValueError("fitnet: its regressor is sized from the models' feature shapes; "
                             "build it with a MethodContext (student, teacher, input_size)")
        s = ctx.feature_shapes("student", ("feats",))["feats"]
        t = ctx.feature_shapes("teacher", ("feats",))["feats"]
        i = self.params.hint_layer
        if i >= min(len(s), len(t)):
            raise ValueError(f"fitnet: hint_layer={i} is out of range: the student has "
                             f"{len(s)} and the teacher {len(t)} feature stages (0-based)")
        try:
            self.conv_reg = ConvReg(tuple(s[i]), tuple(t[i]))
        except ValueError as e:
            raise ValueError(f"fitnet: hint_layer={i}: {e}") from None

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        io = feature_inputs(self.name, batch, ("feats",), p.ignore_index)
        if io is None:
            return zero_loss(batch)
        s, t = io
        i = p.hint_layer
        loss = hint_loss(s["feats"][i], t["feats"][i], self.conv_reg)
        terms["hint"] = loss
        return p.feat_weight * loss
