"""ReviewKD: Distilling Knowledge via Knowledge Review (Chen et al., CVPR 2021).

The student's stage features and pooled feature are fused from the deepest to the shallowest
by attention-based fusion (ABF) modules, each level mixing its own feature with the fused
residual of the level below; every level's output regresses the teacher's feature of the same
level with the hierarchical context loss (HCL: MSE at full resolution plus MSE of 4x4, 2x2 and
1x1 average pools, halving weights). Reference: megvii-research/mdistiller
``mdistiller/distillers/ReviewKD.py`` (commit a08d46f).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from ._feature import compute_feats, no_ignore_index
from .base import Batch, Method, MethodContext
from .params import MethodParams, param
from .registry import register_method

__all__ = ["ABF", "ReviewKD", "ReviewKDParams", "hcl_loss"]


def hcl_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    r"""Hierarchical context loss summed over levels (mdistiller's ``hcl_loss``).

    ``student[i]``, ``teacher[i]``: ``(B, C_i, H_i, W_i)``. Per level, with ``P_l`` the adaptive
    average pool to ``l x l`` and the pools ``l in (4, 2, 1)`` kept only when ``l < H_i``:

    .. math:: \frac{\mathrm{mse}(s, t) + \sum_j 2^{-j}\,\mathrm{mse}(P_{l_j} s, P_{l_j} t)}
              {1 + \sum_j 2^{-j}}

    where ``j = 1, 2, ...`` counts the kept pools.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"hcl_loss: {len(student)} student and {len(teacher)} teacher levels; "
                         "need the same non-zero number")
    total = student[0].new_zeros(())
    for i, (fs, ft) in enumerate(zip(student, teacher)):
        if fs.shape != ft.shape:
            raise ValueError(f"hcl_loss: level {i}: student {tuple(fs.shape)} and teacher "
                             f"{tuple(ft.shape)} differ")
        h = fs.shape[2]
        loss = TF.mse_loss(fs, ft)
        cnt, tot = 1.0, 1.0
        for lvl in (4, 2, 1):
            if lvl >= h:
                continue
            cnt /= 2.0
            loss = loss + TF.mse_loss(TF.adaptive_avg_pool2d(fs, (lvl, lvl)),
                                      TF.adaptive_avg_pool2d(ft, (lvl, lvl))) * cnt
            tot += cnt
        total = total + loss / tot
    return total


class ABF(nn.Module):
    """Attention-based fusion of one level (mdistiller's ``ABF``).

    ``x`` -> ``conv1x1 + BN`` to ``mid`` channels; with ``fuse``, the residual ``y`` of the level
    below (nearest-upsampled to ``x``'s size) is mixed in with two sigmoid attention maps from a
    1x1 conv over ``[x, y]``; the result is resized (nearest) to the teacher's size when it
    differs, and ``conv3x3 + BN`` gives the output. Returns ``(output, residual)``.
    """

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, 1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, 1), nn.Sigmoid()) \
            if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, y: Tensor | None = None, out_shape: tuple[int, int] = (1, 1)
                ) -> tuple[Tensor, Tensor]:
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            if y is None:
                raise ValueError("ABF with fusion needs the residual of the level below")
            y = TF.interpolate(y, (h, w), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if tuple(x.shape[-2:]) != tuple(out_shape):
            x = TF.interpolate(x, out_shape, mode="nearest")
        return self.conv2(x), x


@dataclass(frozen=True)
class ReviewKDParams(MethodParams):
    _rejected = {
        "max_mid_channel": "mdistiller reads REVIEWKD.MAX_MID_CHANNEL but never uses it: the ABF "
                           "mid channels are min(512, the student's pooled dimension), as here",
        "shapes": "derived from the models (the student's stage sizes)",
        "out_shapes": "derived from the models (the teacher's stage sizes)",
        "in_channels": "derived from the models (the student's stage channels)",
        "out_channels": "derived from the models (the teacher's stage channels)",
    }

    ignore_index: int | None = no_ignore_index()
    ce: float = param(1.0, "weight of cross-entropy", check="nonneg")
    warmup: float = param(20.0, "epochs of linear warm-up of the ReviewKD loss", check="nonneg")
    reviewkd_weight: float = param(1.0, "weight of the HCL loss", check="pos")
    stu_preact: bool = param(False, "fuse the student's pre-activation stage features "
                                    "(preact_feats) instead of its stage outputs (feats)")


@register_method("reviewkd")
class ReviewKD(Method):
    r"""ReviewKD: ``ce * CE + warm(epoch) * reviewkd_weight * HCL(ABF(student), teacher)``.

    Levels: the teacher's ``preact_feats[1:]`` and its pooled feature (as ``(B, D, 1, 1)``);
    the student's last as many stage features (``feats``, or ``preact_feats`` with
    ``stu_preact``) and its pooled feature. ABF channels (``in``: student, ``out``: teacher, mid
    ``min(512, student pooled dim)``) and sizes (``shapes``: student, ``out_shapes``: teacher)
    are read from the models, and equal mdistiller's configured values on the pairs it publishes.
    CIFAR-100 reference: ce 1, weight 1 (``configs/cifar100/reviewkd.yaml``: 5 for
    ResNet32x4->ResNet8x4), warm-up 20 epochs, ``stu_preact`` false; ImageNet: weight 1
    (ResNet34->ResNet18) or 8 (ResNet50->MobileNetV1), warm-up 1, ``stu_preact`` true.
    """

    Params = ReviewKDParams
    paper = "Chen et al., 'Distilling Knowledge via Knowledge Review', CVPR 2021"
    code = "megvii-research/mdistiller: mdistiller/distillers/ReviewKD.py"
    student_taps = ("feats", "pooled_feat")
    teacher_taps = ("preact_feats", "pooled_feat")
    trainable_modules = True

    def __init__(self, params: ReviewKDParams | None = None,
                 ctx: MethodContext | None = None) -> None:
        super().__init__(params, ctx)
        if ctx is None:
            raise ValueError("reviewkd needs a MethodContext with both models to size its ABFs")
        kind = "preact_feats" if self.params.stu_preact else "feats"
        #: Read by the engine: the student taps this instance uses.
        self.student_taps = (kind, "pooled_feat")
        s = ctx.feature_shapes("student", self.student_taps)
        t = ctx.feature_shapes("teacher", self.teacher_taps)
        levels = len(t["preact_feats"]) - 1  # stage levels; + the pooled level
        if levels < 1 or len(s[kind]) < levels:
            raise ValueError(f"reviewkd: the teacher has {levels} stages after the stem and the "
                             f"student {len(s[kind])} {kind}; the student needs at least as many")
        s_maps = [tuple(x) for x in s[kind][-levels:]]
        t_maps = [tuple(x) for x in t["preact_feats"][1:]]
        if any(len(x) != 3 for x in s_maps + t_maps):
            raise ValueError("reviewkd needs (C, H, W) stage features")
        s_pool, t_pool = s["pooled_feat"], t["pooled_feat"]
        if len(s_pool) != 1 or len(t_pool) != 1:
            raise ValueError("reviewkd needs (D,) pooled features")
        # mdistiller's configuration, in its orders: channels shallow -> deep, sizes deep ->
        # shallow (the pooled level is 1x1). ``shapes`` (the student's sizes, to which an ABF
        # upsamples the residual) is what each student feature's own size gives at run time.
        self.in_channels = [c for c, _, _ in s_maps] + [s_pool[0]]
        self.out_channels = [c for c, _, _ in t_maps] + [t_pool[0]]
        self.shapes = [(1, 1)] + [(h, w) for _, h, w in reversed(s_maps)]
        self.out_shapes = [(1, 1)] + [(h, w) for _, h, w in reversed(t_maps)]
        mid = min(512, self.in_channels[-1])
        n = len(self.in_channels)
        abfs = [ABF(c, mid, self.out_channels[i], i < n - 1)
                for i, c in enumerate(self.in_channels)]  # built shallow -> deep (RNG order)
        self.abfs = nn.ModuleList(abfs[::-1])  # stored deep -> shallow, as the reference
        self.levels = levels

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        kind = self.student_taps[0]
        sf = {k: compute_feats(v) for k, v in batch.student.feats.items()}
        tf = {k: compute_feats(v) for k, v in batch.teacher.feats.items()}  # type: ignore[union-attr]
        x = [*sf[kind][-self.levels:], sf["pooled_feat"][:, :, None, None]][::-1]
        out, res = self.abfs[0](x[0], out_shape=self.out_shapes[0])
        results = [out]
        for feat, abf, shape in zip(x[1:], self.abfs[1:], self.out_shapes[1:]):
            out, res = abf(feat, res, shape)
            results.insert(0, out)
        teacher = [*tf["preact_feats"][1:], tf["pooled_feat"][:, :, None, None]]
        loss = hcl_loss(results, teacher)
        terms["hcl"] = loss
        return self.params.reviewkd_weight * loss
