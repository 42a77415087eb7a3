"""PKT (Passalis & Tefas, ECCV 2018): probabilistic knowledge transfer of cosine affinities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._feat import check_pair, feature_inputs, zero_loss
from .base import Batch, Method
from .params import MethodParams, param
from .registry import register_method

__all__ = ["PKT", "PKTParams", "pkt_loss"]


def _affinity(f: Tensor, eps: float) -> Tensor:
    f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)
    f = torch.where(torch.isnan(f), 0.0, f)  # the reference's f[f != f] = 0
    sim = (f @ f.t() + 1.0) / 2.0
    return sim / sim.sum(1, keepdim=True)


def pkt_loss(f_s: Tensor, f_t: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Probabilistic knowledge transfer.

    .. math::
        P_{ij} = \frac{(1 + \cos(t_i, t_j)) / 2}{\sum_k (1 + \cos(t_i, t_k)) / 2},\quad
        Q_{ij} \text{ likewise for } s,\quad
        L = \operatorname{mean}_{ij} P_{ij} \log\frac{P_{ij} + \epsilon}{Q_{ij} + \epsilon}

    Cosines use ``f / (|f| + eps)``; NaNs of that division become 0.

    Args:
        f_s: student embeddings ``(B, ...)`` (flattened to ``(B, D_s)``).
        f_t: teacher embeddings ``(B, ...)``; no gradient flows into them. ``D_t`` may differ.
        eps: added to norms and to both probabilities inside the log.

    Returns:
        A scalar, as mdistiller ``mdistiller/distillers/PKT.py`` (``pkt_loss``): the KL terms
        are *averaged* over all ``B^2`` entries (a KL divergence summed over ``j`` would be ``B``
        times larger; the weight 30000 is for this mean).
    """
    check_pair("pkt_loss", f_s, f_t, dim=None)
    q = _affinity(f_s.reshape(f_s.shape[0], -1), eps)
    with torch.no_grad():
        p = _affinity(f_t.detach().reshape(f_t.shape[0], -1), eps)
    return torch.mean(p * torch.log((p + eps) / (q + eps)))


@dataclass(frozen=True)
class PKTParams(MethodParams):
    ce: float = param(1.0, "weight of cross-entropy", check="nonneg")
    feat_weight: float = param(30000.0, "weight of the PKT loss", check="pos")
    eps: float = param(1e-7, "epsilon of the norms and of the KL's log", check="pos")


@register_method("pkt")
class PKT(Method):
    r"""Probabilistic KT on the pooled embeddings: ``ce * CE + feat_weight * PKT(s, t)``.

    See :func:`pkt_loss`; student and teacher ``pooled_feat``, so any pair is supported.
    CIFAR-100 reference (mdistiller ``cfg.py`` PKT; ``eps`` is ``pkt_loss``'s default): ce 1,
    feat_weight 30000, eps 1e-7.
    """

    Params = PKTParams
    paper = ("Passalis & Tefas, 'Learning Deep Representations with Probabilistic Knowledge "
             "Transfer', ECCV 2018")
    code = "megvii-research/mdistiller: mdistiller/distillers/PKT.py"
    student_taps = ("pooled_feat",)
    teacher_taps = ("pooled_feat",)

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        io = feature_inputs(self.name, batch, ("pooled_feat",), p.ignore_index)
        if io is None:
            return zero_loss(batch)
        s, t = io
        loss = pkt_loss(s["pooled_feat"], t["pooled_feat"], p.eps)
        terms["pkt"] = loss
        return p.feat_weight * loss
