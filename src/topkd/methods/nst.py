"""NST (Huang & Wang, 2017): neuron selectivity transfer, MMD with a polynomial kernel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as TF
from torch import Tensor

from ._feat import feature_inputs, pool_to_common, stage_pairs, zero_loss
from .base import Batch, Method
from .params import MethodParams, param
from .registry import register_method

__all__ = ["NST", "NSTParams", "nst_loss"]


def _poly_mean(a: Tensor, b: Tensor) -> Tensor:
    # mean over (batch, channel pairs) of (a_i . b_j)^2 for (B, C, N) inputs. The reference
    # (poly_kernel) builds the (B, C_b, C_a, N) product first: up to 1 GiB per stage at batch 64.
    return (a @ b.transpose(1, 2)).pow(2).mean()


def nst_loss(g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> Tensor:
    r"""Neuron selectivity transfer summed over stages.

    .. math::
        \sum_i \overline{k(t_i, t_i)} + \overline{k(s_i, s_i)} - 2\,\overline{k(s_i, t_i)},
        \qquad k(a, b)_{bjl} = (a_{bj} \cdot b_{bl})^2

    where every channel map is flattened over positions and L2-normalised, and the bar is the
    mean over batch and channel pairs (a squared MMD with the kernel ``(x . y)^2``; the first
    term is a constant of the teacher).

    Args:
        g_s: student stages, each ``(B, C_s, H, W)``.
        g_t: teacher stages, each ``(B, C_t, H', W')``; paired with ``g_s`` in order (``zip``).
            Where ``H != H'`` the larger map is average-pooled to the smaller size first.

    Returns:
        A scalar, as mdistiller ``mdistiller/distillers/NST.py`` (``nst_loss``), computed with
        batched matrix products instead of its broadcast ``(B, C, C, HW)`` product (same
        values up to float rounding).
    """
    loss = None
    for f_s, f_t in stage_pairs("nst_loss", g_s, g_t):
        f_s, f_t = pool_to_common(f_s, f_t.detach())
        f_s = TF.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
        f_t = TF.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
        term = _poly_mean(f_t, f_t) + _poly_mean(f_s, f_s) - 2 * _poly_mean(f_s, f_t)
        loss = term if loss is None else loss + term
    return loss


@dataclass(frozen=True)
class NSTParams(MethodParams):
    ce: float = param(1.0, "weight of cross-entropy", check="nonneg")
    feat_weight: float = param(50.0, "weight of the NST loss", check="pos")


@register_method("nst")
class NST(Method):
    r"""Neuron selectivity transfer: ``ce * CE + feat_weight * sum_i MMD^2_poly(s_i, t_i)``.

    Over the stage outputs ``feats[1:]`` paired in order (see :func:`nst_loss`); channel counts
    may differ, different spatial sizes are pooled to the smaller. CIFAR-100 reference
    (mdistiller ``cfg.py`` NST): ce 1, feat_weight 50.
    """

    Params = NSTParams
    paper = ("Huang & Wang, 'Like What You Like: Knowledge Distill via Neuron Selectivity "
             "Transfer', arXiv 1707.01219, 2017")
    code = "megvii-research/mdistiller: mdistiller/distillers/NST.py"
    student_taps = ("feats",)
    teacher_taps = ("feats",)

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        io = feature_inputs(self.name, batch, ("feats",), p.ignore_index)
        if io is None:
            return zero_loss(batch)
        s, t = io
        loss = nst_loss(s["feats"][1:], t["feats"][1:])
        terms["nst"] = loss
        return p.feat_weight * loss
