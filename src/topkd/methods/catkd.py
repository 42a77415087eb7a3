"""CAT-KD (Guo et al., CVPR 2023): class attention (CAM) transfer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from topkd.losses._validate import as_compute

from .base import Batch, Method, MethodContext
from .params import MethodParams, param
from .registry import register_method

__all__ = ["CATKD", "CATKDParams", "binarize_cams", "cat_loss", "class_activation_maps"]


def class_activation_maps(feat: Tensor, weight: Tensor, resolution: int | None = None) -> Tensor:
    r"""Class activation maps ``CAM[b, c] = sum_d W[c, d] f[b, d]``: the classifier applied at
    every position of the final map (the reference's bias-free 1x1 ``conv_test``).

    With ``resolution`` the map is average-pooled to ``resolution x resolution`` *first*:
    pooling and the (linear) classifier commute, so this equals pooling the full CAMs, at a
    fraction of the cost.

    Args:
        feat: the map the global pooling reads, ``(B, D, H, W)``.
        weight: the classifier weight ``(C, D)``.
        resolution: optional output size ``r`` (``adaptive_avg_pool2d``).

    Returns:
        ``(B, C, H, W)``, or ``(B, C, r, r)``.
    """
    if feat.dim() != 4 or weight.dim() != 2 or weight.shape[1] != feat.shape[1]:
        raise ValueError(f"class_activation_maps: a (B, D, H, W) map and a (C, D) classifier "
                         f"weight are needed, got {tuple(feat.shape)} and {tuple(weight.shape)}")
    if resolution is not None:
        feat = F.adaptive_avg_pool2d(feat, (resolution, resolution))
    return torch.einsum("cd,bdhw->bchw", weight.to(feat.dtype), feat)


def binarize_cams(cams: Tensor) -> Tensor:
    r"""CAT's binarisation: ``1[CAM > mean_{h,w} |CAM|]`` per map (``IF_BINARIZE``), as float."""
    thr = cams.abs().mean(dim=(2, 3), keepdim=True)
    return (cams > thr).to(cams.dtype)


def cat_loss(cams_s: Tensor, cams_t: Tensor, resolution: int, normalize: bool) -> Tensor:
    r"""CAT loss: ``MSE(N(pool_r(CAM_s)), N(pool_r(CAM_t)))`` over every element.

    ``pool_r`` is ``adaptive_avg_pool2d`` to ``r x r`` (an identity for maps already at
    ``r x r``), ``N`` L2-normalises each class map over its positions when ``normalize``
    (``F.normalize(x, dim=(2, 3))``), else the identity (CAT-KD ``CAT_loss``, GzyAftermath/CAT-KD
    ``mdistiller/distillers/CAT_KD.py``).

    Args:
        cams_s: student CAMs ``(B, C, H_s, W_s)``.
        cams_t: teacher CAMs ``(B, C, H_t, W_t)`` (no gradient expected).
    """
    if cams_s.shape[:2] != cams_t.shape[:2]:
        raise ValueError(f"cat_loss: student CAMs {tuple(cams_s.shape)} and teacher CAMs "
                         f"{tuple(cams_t.shape)} differ in batch size or number of classes")
    s = F.adaptive_avg_pool2d(cams_s, (resolution, resolution))
    t = F.adaptive_avg_pool2d(cams_t, (resolution, resolution))
    if normalize:
        s, t = F.normalize(s, dim=(2, 3)), F.normalize(t, dim=(2, 3))
    return F.mse_loss(s, t)


@dataclass(frozen=True)
class CATKDParams(MethodParams):
    ignore_index: int | None = param(None, "label value whose rows CE drops (the CAM loss uses "
                                           "no labels)")
    cat_weight: float = param(400.0, "weight beta of the CAT loss (CAT_loss_weight)",
                              check="pos")
    resolution: int = param(2, "side of the pooled CAMs (CAM_RESOLUTION)", check="int1")
    normalize: bool = param(True, "L2-normalise each pooled class map (IF_NORMALIZE)")
    binarize: bool = param(False, "binarise the teacher's CAMs at their mean |CAM| (IF_BINARIZE, "
                                  "the paper's CAT ablation)")
    student_fc_bias: bool = param(False, "train the student classifier's bias; false as the "
                                         "reference, whose CAM-style student has none: the bias "
                                         "is zeroed and frozen")


@register_method("catkd")
class CATKD(Method):
    r"""CAT-KD: ``ce * CE + warm * cat_weight * MSE(N(pool(CAM_s)), N(pool(CAM_t)))``.

    ``CAM = W f``: the classifier weight (no bias) at every position of the map the global
    pooling reads (the stage split's ``final_map``, :mod:`topkd.models.stages`; for most
    families the last ``feats``). The reference converts both networks to CAM models (a
    bias-free 1x1 conv before the pooling): the teacher loses its classifier bias (its logits
    are unused here) and the student has none, so by default the student's classifier bias is
    zeroed and frozen (``student_fc_bias: true`` keeps it). Defaults are the reference's
    ``cfg.py``; the per-pair CIFAR-100 values (``CAT_KD/*.yaml``) are in the configs. The
    reference's ``onlyCAT`` is ``ce: 0``; its "only transfer certain classes" ablation is not
    offered.
    """

    Params = CATKDParams
    paper = "Guo et al., 'Class Attention Transfer Based Knowledge Distillation', CVPR 2023"
    code = "GzyAftermath/CAT-KD: mdistiller/distillers/CAT_KD.py"
    # Per family the final map reads feats or preact_feats; instances keep what their models use.
    student_taps = ("feats", "preact_feats")
    teacher_taps = ("feats", "preact_feats")

    def __init__(self, params: CATKDParams | None = None, ctx: MethodContext | None = None):
        super().__init__(params, ctx)
        from topkd.models.stages import stage_split

        if ctx is None or ctx.student is None or ctx.teacher is None:
            raise ValueError("catkd needs the student and the teacher models (their classifiers "
                             "make the CAMs): build it with a MethodContext holding both")
        split_s, split_t = stage_split(ctx.student), stage_split(ctx.teacher)
        w_s, w_t = split_s.classifier.weight, split_t.classifier.weight
        if w_s.shape[0] != w_t.shape[0]:
            raise ValueError(f"catkd: the student has {w_s.shape[0]} classes, the teacher "
                             f"{w_t.shape[0]}: CAMs are compared class by class")
        for who, split in (("student", split_s), ("teacher", split_t)):
            if split.pool != (1, 1):  # e.g. the fashion_mnist_pairs CNNs, one cell per half
                raise ValueError(f"catkd: the {who} pools a {split.pool} grid before its "
                                 "classifier, so the classifier cannot be applied at each "
                                 "position of the map (CAMs need a global average pool)")
        self.student_taps, self.teacher_taps = split_s.taps, split_t.taps
        # The models are the engine's, not this method's modules: kept out of the module tree.
        self._splits = {"student": split_s, "teacher": split_t}
        bias = getattr(split_s.classifier, "bias", None)
        if not self.params.student_fc_bias and bias is not None:
            with torch.no_grad():
                bias.zero_()
            bias.requires_grad_(False)

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        split_s, split_t = self._splits["student"], self._splits["teacher"]
        w_s, w_t = split_s.classifier.weight, split_t.classifier.weight
        f_s = as_compute(split_s.final_map(batch.student.feats))  # fp32 under AMP
        f_t = as_compute(split_t.final_map(batch.teacher.feats))  # type: ignore[union-attr]
        cam_s = class_activation_maps(f_s, w_s, p.resolution)
        if p.binarize:  # thresholds of the full-resolution maps
            cam_t = binarize_cams(class_activation_maps(f_t, w_t.detach()))
        else:
            cam_t = class_activation_maps(f_t, w_t.detach(), p.resolution)
        terms["cat"] = cat_loss(cam_s, cam_t, p.resolution, p.normalize)
        return p.cat_weight * terms["cat"]

