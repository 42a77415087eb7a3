"""KDSVD (Lee et al., ECCV 2018): self-supervised KD with singular value decomposition."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as TF
from torch import Tensor

from ._feat import as_float, feature_inputs, stage_pairs, zero_loss
from .base import Batch, Method
from .params import MethodParams, param
from .registry import register_method

__all__ = ["KDSVD", "KDSVDParams", "kdsvd_loss"]


def _finite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, 0.0)


class _SafeSVD(torch.autograd.Function):
    r"""``(S, V)`` of the thin SVD ``A = U diag(S) V^T`` of ``(B, M, N)`` matrices, whose backward
    is the exact one (Townsend, "Differentiating the singular value decomposition", 2016)

    .. math::
        \bar A = U\big(\mathrm{diag}(\bar S) + S\,(F \circ (V^T\bar V - \bar V^T V))\big)V^T
                 + U S^{-1} \bar V^T (I - V V^T),\qquad F_{ij} = 1 / (s_j^2 - s_i^2),

    with the entries of :math:`F` and :math:`S^{-1}` that are not finite set to 0. They multiply
    only zeros when the repeated (or zero) singular values belong to vectors the loss does not
    use, as in KDSVD, which keeps the leading few: there the result is the limit of the
    gradient, where ``torch.linalg.svd``'s gives ``inf * 0 = NaN``. Between repeated singular
    values that the loss does use, the gradient is undefined and their term is dropped.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor) -> tuple[Tensor, Tensor]:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        v = vh.mH
        ctx.save_for_backward(u, s, v)
        return s, v

    @staticmethod
    def backward(ctx: Any, gs: Tensor, gv: Tensor) -> Tensor:
        # autograd materialises an unused output's gradient as zeros: both are tensors
        u, s, v = ctx.saved_tensors
        s2 = s * s
        f = _finite(1.0 / (s2.unsqueeze(-2) - s2.unsqueeze(-1)))  # the diagonal (1/0) too
        vtg = v.mT @ gv
        inner = torch.diag_embed(gs) + s.unsqueeze(-1) * (f * (vtg - vtg.mT))
        out = u @ inner @ v.mT
        if v.shape[-2] > v.shape[-1]:  # wide A: V does not span R^N
            s_inv = _finite(1.0 / s)
            out = out + (u * s_inv.unsqueeze(-2)) @ (gv.mT - (gv.mT @ v) @ v.mT)
        return out


def _right_singular(feat: Tensor, n: int, channel_svd: bool = False,
                    safe: bool = False) -> tuple[Tensor, Tensor]:
    """The first ``n`` singular values ``(B, n)`` and right singular vectors ``(B, W, n)`` of
    ``feat`` viewed as ``(B, C*H, W)`` (``channel_svd``: ``(B, H*W, C)``, vectors ``(B, C, n)``),
    each L2-normalised (mdistiller's ``svd``; its left singular vectors are computed there and
    never used). ``safe``: :class:`_SafeSVD`'s gradient instead of torch's."""
    b, c, h, w = feat.shape
    x = feat.permute(0, 2, 3, 1).reshape(b, h * w, c) if channel_svd else \
        feat.reshape(b, c * h, w)
    if safe:
        s, v = _SafeSVD.apply(as_float(x))
    else:
        _, s, vh = torch.linalg.svd(as_float(x), full_matrices=False)
        v = vh.mH
    s, v = _finite(s), _finite(v)
    return TF.normalize(s[:, :n], dim=1), TF.normalize(v[:, :, :n], dim=1)


def _align(v_s: Tensor, v_t: Tensor) -> Tensor:
    # mdistiller's align_rsv: each teacher vector takes the student vector of largest |cosine|,
    # with the sign of that cosine (ties: the sum of the tied vectors).
    cos = v_s.mT @ v_t
    best = cos.abs().amax(1, keepdim=True)
    return v_s @ torch.where(cos.abs() == best, cos.sign(), 0.0)


def kdsvd_loss(g_s: Sequence[Tensor], g_t: Sequence[Tensor], k: int = 1,
               channel_svd: bool = False,
               svd_grad: Literal["torch", "safe"] = "torch") -> Tensor:
    r"""KDSVD: RBF correlations of singular vectors between consecutive stages.

    For every stage ``i`` (student and teacher paired in order) the map ``(B, C, H, W)`` is
    viewed as a ``(B, C*H, W)`` matrix; the teacher keeps its first ``k`` right singular vectors
    ``V_t`` (``(B, W, k)``) and normalised singular values ``\sigma_t``, the student its first
    ``k + 3`` vectors, of which each teacher vector takes the one of largest absolute cosine,
    sign-aligned. Both sides are scaled by the *teacher's* ``\sigma_t``. Between consecutive
    stages:

    .. math::
        L = \frac{1}{B}\sum_{i \ge 1} \sum \big(R(V_s^i, V_s^{i-1}) - R(V_t^i, V_t^{i-1})\big)^2,
        \qquad R(a, b)_{bpqj} = \exp\big(-(a_{bpj} - b_{bqj})^2 / 8\big)

    with non-finite entries of the squared difference set to 0.

    Args:
        g_s: student stages, each ``(B, C_s, H, W)``; at least 2.
        g_t: teacher stages, each ``(B, C_t, H_t, W)``: the same width ``W`` as the student's
            stage (the singular vectors live in that dimension); no gradient flows into them.
        k: number of teacher singular vectors.
        channel_svd: the corrected layout: each stage viewed as ``(B, H*W, C)``, as the
            authors' TensorFlow code (singular vectors over channels, so every paired stage
            needs the same channel count instead of the same width).
        svd_grad: ``"torch"`` (the reference: ``torch.linalg.svd``'s gradient, NaN as soon as
            a student map has two equal singular values, e.g. two all-zero columns after a
            ReLU, although the loss uses only the leading vectors) or ``"safe"`` (the corrected
            option: the same gradient without the terms of the unused repeated values, see
            :class:`_SafeSVD`; equal to torch's wherever that is finite). The authors'
            TensorFlow code registers its own SVD gradient to the same end, but its NaN removal
            zeroes the whole coupling matrix (its diagonal ``1/0`` counts as non-finite), so
            for ``(H*W, C)`` matrices with ``H*W >= C`` (every stage of a CIFAR ResNet) the
            loss sends no gradient at all; we do not reproduce that.

    Returns:
        A scalar, as mdistiller ``mdistiller/distillers/KDSVD.py`` (``kdsvd_loss``), with its
        quirks: the SVD of ``(C*H, W)`` matrices (the NCHW transcription of the authors' NHWC
        ``(H*W, C)`` reshape; ``channel_svd`` corrects it); with ``k = 1`` the normalised
        singular value is 1, so :math:`\sigma_t` has no effect; the SVD runs in at least
        float32 (mdistiller casts to float32; float64 inputs stay float64 here). The loss
        depends on the SVD's sign convention for the teacher's vectors (LAPACK's, as the
        reference's ``torch.svd``).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"kdsvd_loss: k must be an int >= 1, got {k!r}")
    if svd_grad not in ("torch", "safe"):
        raise ValueError(f"kdsvd_loss: svd_grad must be 'torch' or 'safe', got {svd_grad!r}")
    pairs = stage_pairs("kdsvd_loss", g_s, g_t)
    if len(pairs) < 2:
        raise ValueError(f"kdsvd_loss: needs at least 2 stages (it correlates consecutive "
                         f"stages), got {len(pairs)}")
    dim, what = (1, "channels") if channel_svd else (3, "width")
    for i, (f_s, f_t) in enumerate(pairs):
        if f_s.shape[dim] != f_t.shape[dim]:
            how = "over channels (channel_svd)" if channel_svd else "over the width (as mdistiller)"
            raise ValueError(
                f"kdsvd_loss: stage {i} has {what} {f_s.shape[dim]} in the student and "
                f"{f_t.shape[dim]} in the teacher; KDSVD compares singular vectors {how}, so "
                f"every paired stage needs the same {what}")
    loss = None
    prev: tuple[Tensor, Tensor] | None = None
    for f_s, f_t in pairs:
        with torch.no_grad():
            s_t, v_t = _right_singular(f_t.detach(), k, channel_svd)
        _, v_s = _right_singular(f_s, k + 3, channel_svd, safe=svd_grad == "safe")
        v_s = _align(v_s, v_t)
        s_t = s_t.unsqueeze(1)
        v_t, v_s = v_t * s_t, v_s * s_t
        if prev is not None:
            v_sb, v_tb = prev
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            term = _finite((s_rbf - t_rbf).pow(2)).sum()
            loss = term if loss is None else loss + term
        prev = (v_s, v_t)
    return loss / g_s[0].shape[0]


@dataclass(frozen=True)
class KDSVDParams(MethodParams):
    ce: float = param(1.0, "weight of cross-entropy", check="nonneg")
    feat_weight: float = param(1.0, "weight of the KDSVD loss", check="pos")
    k: int = param(1, "number of teacher singular vectors (the student uses k + 3)",
                   check="int1")
    channel_svd: bool = param(False, "corrected layout: SVD of each stage as a (H*W, C) matrix "
                                     "as the authors' code (mdistiller: (C*H, W)); needs equal "
                                     "channel counts per stage")
    svd_grad: Literal["torch", "safe"] = param(
        "torch", "gradient of the student's SVD: 'torch' (the reference; NaN at repeated "
                 "singular values, even unused ones) or 'safe' (corrected: those terms dropped)")


@register_method("kdsvd")
class KDSVD(Method):
    r"""KD with SVD: ``ce * CE + feat_weight * KDSVD(feats[1:])``.

    See :func:`kdsvd_loss` (and its quirks, reproduced). Needs the same width in each paired
    stage of student and teacher (``channel_svd``: the same channel count). CIFAR-100 reference
    (mdistiller ``cfg.py`` KDSVD): ce 1, feat_weight 1, k 1; ``channel_svd`` off.
    """

    Params = KDSVDParams
    paper = ("Lee et al., 'Self-supervised Knowledge Distillation Using Singular Value "
             "Decomposition', ECCV 2018")
    code = "megvii-research/mdistiller: mdistiller/distillers/KDSVD.py"
    student_taps = ("feats",)
    teacher_taps = ("feats",)

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        io = feature_inputs(self.name, batch, ("feats",), p.ignore_index)
        if io is None:
            return zero_loss(batch)
        s, t = io
        loss = kdsvd_loss(s["feats"][1:], t["feats"][1:], p.k, p.channel_svd, p.svd_grad)
        terms["kdsvd"] = loss
        return p.feat_weight * loss
