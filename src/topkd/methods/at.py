"""AT (Zagoruyko & Komodakis, ICLR 2017): attention transfer on every stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as TF
from torch import Tensor

from ._feat import feature_inputs, pool_to_common, stage_pairs, zero_loss
from .base import Batch, Method
from .params import MethodParams, param
from .registry import register_method

__all__ = ["AT", "ATParams", "at_loss", "attention_map"]


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    r"""``normalize(mean_c(f^p))``: ``(B, C, H, W) -> (B, H*W)``, L2-normalised per sample."""
    return TF.normalize(f.pow(p).mean(1).reshape(f.shape[0], -1))


def at_loss(g_s: Sequence[Tensor], g_t: Sequence[Tensor], p: float = 2.0) -> Tensor:
    r"""Attention-transfer loss summed over stages.

    .. math::
        \sum_i \operatorname{mean}_{b, j}\big(a(s_i)_{bj} - a(t_i)_{bj}\big)^2,\qquad
        a(f) = \frac{\operatorname{mean}_c f^p}{\lVert \operatorname{mean}_c f^p \rVert_2}

    Args:
        g_s: student stages, each ``(B, C_s, H, W)``.
        g_t: teacher stages, each ``(B, C_t, H', W')``; paired with ``g_s`` in order (as
            ``zip``: the longer list's extra stages are unused). Where ``H != H'`` the larger map
            is average-pooled to the smaller size first. Channel counts may differ.
        p: the power of the attention map.

    Returns:
        A scalar, as mdistiller ``mdistiller/distillers/AT.py`` (``at_loss``) and the authors'
        code: the squared difference is averaged over batch and positions (the paper writes a
        sum of L2 distances; the weight 1000 is for this mean).
    """
    loss = None
    for f_s, f_t in stage_pairs("at_loss", g_s, g_t):
        f_s, f_t = pool_to_common(f_s, f_t.detach())
        term = (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()
        loss = term if loss is None else loss + term
    return loss


@dataclass(frozen=True)
class ATParams(MethodParams):
    ce: float = param(1.0, "weight of cross-entropy", check="nonneg")
    feat_weight: float = param(1000.0, "weight of the attention loss", check="pos")
    p: float = param(2.0, "power of the attention map (mean over channels of f^p)", check="pos")


@register_method("at")
class AT(Method):
    r"""Attention transfer: ``ce * CE + feat_weight * sum_i mean((a(s_i) - a(t_i))^2)``.

    Over the stage outputs ``feats[1:]`` (the stem excluded) paired in order; see
    :func:`at_loss`. CIFAR-100 reference (mdistiller ``cfg.py`` AT): ce 1, feat_weight 1000,
    p 2.
    """

    Params = ATParams
    paper = ("Zagoruyko & Komodakis, 'Paying More Attention to Attention: Improving the "
             "Performance of CNNs via Attention Transfer', ICLR 2017")
    code = "megvii-research/mdistiller: mdistiller/distillers/AT.py"
    student_taps = ("feats",)
    teacher_taps = ("feats",)

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        io = feature_inputs(self.name, batch, ("feats",), p.ignore_index)
        if io is None:
            return zero_loss(batch)
        s, t = io
        loss = at_loss(s["feats"][1:], t["feats"][1:], p.p)
        terms["at"] = loss
        return p.feat_weight * loss
