"""OFD: A Comprehensive Overhaul of Feature Distillation (Heo et al., ICCV 2019).

The student's pre-activation stage features, through a ``conv + BN`` connector each, regress the
teacher's pre-activation features with a *partial L2* distance that ignores the teacher's negative
responses below a per-channel margin, the expected value of the teacher's negative
pre-activations, computed from the BatchNorm before each stage's ReLU. Reference:
megvii-research/mdistiller ``mdistiller/distillers/OFD.py`` (commit a08d46f).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from ._feature import compute_feats, no_ignore_index
from .base import Batch, Method, MethodContext
from .params import MethodParams, param
from .registry import register_method

__all__ = ["OFD", "OFDParams", "ofd_loss", "ofd_margin", "partial_l2"]


def ofd_margin(weight: Tensor, bias: Tensor) -> Tensor:
    r"""OFD's margin per channel from a BatchNorm's affine parameters: ``(C,), (C,) -> (C,)``.

    With :math:`s = |\gamma|`, :math:`m = \beta` (the pre-activation is modelled as
    :math:`\mathcal N(m, s^2)`), the margin is the mean of its negative part,

    .. math:: \mathrm{margin} = m - s\,\frac{\varphi(m/s)}{\Phi(-m/s)} \quad\text{if }
              \Phi(-m/s) > 10^{-3}, \text{ else } -3s,

    as mdistiller's ``init_ofd_modules`` (computed in float64, returned in ``weight``'s dtype).
    A zero ``weight`` (a constant channel), where the reference divides by zero, gives the
    limit ``min(m, 0)``.
    """
    if weight.shape != bias.shape or weight.dim() != 1:
        raise ValueError(f"ofd_margin: weight and bias must be (C,), got {tuple(weight.shape)} "
                         f"and {tuple(bias.shape)}")
    s = weight.detach().double().abs()
    m = bias.detach().double()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    r = m / safe
    cdf = torch.special.ndtr(-r)
    pdf = torch.exp(-r * r / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(cdf > 1e-3, m - safe * pdf / cdf.clamp_min(1e-3), -3 * s)
    margin = torch.where(s > 0, margin, m.clamp(max=0))
    return margin.to(weight.dtype)


def partial_l2(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    r"""OFD's partial L2 distance, summed over ``(C, H, W)`` and averaged over the batch.

    ``source``, ``target``: ``(B, C, H, W)``; ``margin``: ``(C,)`` (or broadcastable). Per element

    .. math:: d = \begin{cases} (s - t)^2 & t > 0 \text{ or } (s > t,\ m < t \le 0) \\
              (s - m)^2 & s > m \ge t \\ 0 & \text{otherwise} \end{cases}

    (mdistiller's ``feat_loss``; ``target`` is the teacher feature, ``m`` the margin).
    """
    if source.shape != target.shape or source.dim() != 4:
        raise ValueError(f"partial_l2: source and target must be equal (B, C, H, W) shapes, got "
                         f"{tuple(source.shape)} and {tuple(target.shape)}")
    m = margin.to(source).reshape(1, -1, 1, 1) if margin.dim() == 1 else margin.to(source)
    loss = ((source - m) ** 2 * ((source > m) & (target <= m))
            + (source - target) ** 2 * ((source > target) & (target > m) & (target <= 0))
            + (source - target) ** 2 * (target > 0))
    return loss.abs().mean(0).sum()  # abs: as the reference (a no-op on these squares)


def ofd_loss(student: Sequence[Tensor], teacher: Sequence[Tensor],
             margins: Sequence[Tensor]) -> Tensor:
    r"""OFD's distillation distance over stages (mdistiller's ``ofd_loss``).

    ``student[i]``: the connector output ``(B, C_i, h_i, w_i)``; ``teacher[i]``: the teacher's
    pre-activation ``(B, C_i, H_i, W_i)``, average-pooled (adaptive) to ``(h_i, w_i)`` and
    detached; ``margins[i]``: ``(C_i,)``. With ``n`` stages the deeper ones weigh more:

    .. math:: \sum_i \mathrm{partial\_l2}(s_i, \mathrm{pool}(t_i), m_i) / 2^{\,n-1-i}
    """
    if not (len(student) == len(teacher) == len(margins)) or not student:
        raise ValueError(f"ofd_loss: need as many student features ({len(student)}), teacher "
                         f"features ({len(teacher)}) and margins ({len(margins)}), at least one")
    n = len(student)
    total = student[0].new_zeros(())
    for i, (s, t, m) in enumerate(zip(student, teacher, margins)):
        t = TF.adaptive_avg_pool2d(t, s.shape[-2:]).detach()
        total = total + partial_l2(s, t, m) / 2 ** (n - i - 1)
    return total


def _connector(cin: int, cout: int, k: int) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, k, stride=1, padding=(k - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k * k * cout)))
    return nn.Sequential(conv, nn.BatchNorm2d(cout))  # BN: weight 1, bias 0 (its default)


@dataclass(frozen=True)
class OFDParams(MethodParams):
    ignore_index: int | None = no_ignore_index()
    ce: float = param(1.0, "weight of cross-entropy", check="nonneg")
    feat_weight: float = param(1e-3, "weight of the OFD distance", check="pos")
    kernel_size: int = param(1, "kernel size of each stage's conv+BN connector", check="int1")
    teacher_bn: Literal["batch", "running"] = param(
        "batch", "teacher BatchNorm statistics during training: batch (mdistiller: its OFD "
                 "leaves the teacher in train mode; running statistics are not updated here) "
                 "or running (the teacher in eval mode, as in every other method)")


@register_method("ofd")
class OFD(Method):
    r"""OFD: ``ce * CE + feat_weight * sum_i partial_l2(conn_i(s_i), pool(t_i), m_i) / 2^(n-1-i)``.

    ``s_i``/``t_i``: the student's and teacher's ``preact_feats[1:]`` (the stem dropped), aligned
    from the deepest stage when their counts differ; ``conn_i``: ``Conv(k, no bias) + BN`` to the
    teacher's channels; ``m_i``: :func:`ofd_margin` of the teacher's BatchNorm before that
    stage's ReLU (:func:`topkd.models.bn_before_relu.bn_before_relu`). CIFAR-100 reference
    (mdistiller ``cfg.py``): ce 1, feat_weight 1e-3, kernel 1; ImageNet ResNet50 -> MobileNetV1:
    feat_weight 1e-4.

    Reference quirks: the teacher runs with batch statistics (``teacher_bn: batch``); mdistiller
    indexes margins from the teacher's first stage even when the lists were aligned from the last
    (it fails for a teacher with more stages than the student); we align margins with the
    features, which equals the reference wherever it runs.
    """

    Params = OFDParams
    paper = "Heo et al., 'A Comprehensive Overhaul of Feature Distillation', ICCV 2019"
    code = "megvii-research/mdistiller: mdistiller/distillers/OFD.py"
    student_taps = ("preact_feats",)
    teacher_taps = ("preact_feats",)
    trainable_modules = True

    def __init__(self, params: OFDParams | None = None, ctx: MethodContext | None = None) -> None:
        super().__init__(params, ctx)
        if ctx is None or ctx.teacher is None:
            raise ValueError("ofd needs the teacher model (MethodContext.teacher) for its "
                             "BatchNorm margins; a teacher-logit cache cannot be used")
        from topkd.models.bn_before_relu import bn_before_relu

        p = self.params
        s_shapes = ctx.feature_shapes("student", ("preact_feats",))["preact_feats"][1:]
        t_shapes = ctx.feature_shapes("teacher", ("preact_feats",))["preact_feats"][1:]
        bns = bn_before_relu(ctx.teacher)
        if len(bns) != len(t_shapes):
            raise ValueError(f"ofd: {len(bns)} teacher BatchNorms for {len(t_shapes)} stages")
        n = min(len(s_shapes), len(t_shapes))
        if n == 0:
            raise ValueError("ofd needs at least one stage after the stem in both models")
        s_shapes, t_shapes, bns = s_shapes[-n:], t_shapes[-n:], bns[-n:]
        for i, (bn, t) in enumerate(zip(bns, t_shapes)):
            if bn.num_features != t[0]:
                raise ValueError(f"ofd: teacher stage {i} has {t[0]} channels but its BatchNorm "
                                 f"{bn.num_features}")
        self.connectors = nn.ModuleList(
            _connector(s[0], t[0], p.kernel_size) for s, t in zip(s_shapes, t_shapes))
        for i, bn in enumerate(bns):
            self.register_buffer(f"margin{i}", ofd_margin(bn.weight, bn.bias))
        self.num_stages = n
        #: Read by the engine: run the teacher's BatchNorms on batch statistics.
        self.teacher_bn_batch_stats = p.teacher_bn == "batch"

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        n = self.num_stages
        s = compute_feats(batch.student.feats["preact_feats"][1:])
        t = compute_feats(batch.teacher.feats["preact_feats"][1:])  # type: ignore[union-attr]
        if len(s) < n or len(t) < n:
            raise ValueError(f"ofd: expected {n} pre-activation stages after the stem, got "
                             f"{len(s)} (student) and {len(t)} (teacher)")
        s = [conn(f) for conn, f in zip(self.connectors, s[-n:])]
        margins = [getattr(self, f"margin{i}") for i in range(n)]
        loss = ofd_loss(s, t[-n:], margins)
        terms["ofd"] = loss
        return self.params.feat_weight * loss
