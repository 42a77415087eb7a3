"""SimKD (Chen et al., CVPR 2022): the student reuses the teacher's classifier."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from topkd.losses._validate import as_compute

from .base import Batch, Method, MethodContext
from .params import MethodParams, param
from .registry import register_method

__all__ = ["SimKD", "SimKDParams", "simkd_align", "simkd_loss"]


def simkd_align(feat_s: Tensor, feat_t: Tensor) -> tuple[Tensor, Tensor]:
    r"""SimKD's spatial alignment of the last stage outputs: ``(source, target)``.

    The larger map is average-pooled to the smaller one's size: if :math:`H_s > H_t` the student
    map goes to ``(H_t, H_t)``, else the teacher map goes to ``(H_s, H_s)`` (an identity when the
    sizes agree). As the reference (``SimKD.forward``, DefangChen/SimKD ``models/util.py``), only
    heights are compared and the output is square; every zoo map is square.

    Args:
        feat_s: student ``(B, C_s, H_s, W_s)``.
        feat_t: teacher ``(B, C_t, H_t, W_t)``.
    """
    if feat_s.dim() != 4 or feat_t.dim() != 4 or feat_s.shape[0] != feat_t.shape[0]:
        raise ValueError(f"simkd_align: expected (B, C, H, W) maps with one batch size, got "
                         f"{tuple(feat_s.shape)} and {tuple(feat_t.shape)}")
    h_s, h_t = feat_s.shape[2], feat_t.shape[2]
    if h_s > h_t:
        return F.adaptive_avg_pool2d(feat_s, (h_t, h_t)), feat_t
    return feat_s, F.adaptive_avg_pool2d(feat_t, (h_s, h_s))


def simkd_loss(projected_s: Tensor, target_t: Tensor) -> Tensor:
    r"""SimKD's loss: mean squared error between the projected student map and the (aligned)
    teacher map, ``mean((P(f_s) - f_t)^2)`` over every element (``nn.MSELoss()``).

    Args:
        projected_s: ``P(align(f_s))``, ``(B, C_t, H, W)``.
        target_t: the aligned teacher map, same shape (not detached here: the teacher's
            features carry no gradient).
    """
    if projected_s.shape != target_t.shape:
        raise ValueError(f"simkd_loss: projected student {tuple(projected_s.shape)} and teacher "
                         f"{tuple(target_t.shape)} maps differ in shape")
    return F.mse_loss(projected_s, target_t)


@dataclass(frozen=True)
class SimKDParams(MethodParams):
    ce: float = param(0.0, "weight of CE on the student's *own* classifier (unused by the "
                           "SimKD network; the reference computes it with weight 0, -c 0)",
                      check="nonneg")
    ignore_index: int | None = param(None, "label value whose rows CE drops (the feature loss "
                                           "uses no labels)",
                                     when=(lambda p: p.ce > 0, "ce > 0"))
    feat_weight: float = param(1.0, "weight of the feature MSE (the reference's -b)", check="pos")
    factor: int = param(2, "projector bottleneck: teacher channels // factor in the middle",
                        check="int1")


@register_method("simkd")
class SimKD(Method):
    r"""SimKD: ``ce * CE(student) + warm * feat_weight * MSE(P(align(f_s)), align(f_t))``.

    ``f_s`` is the student's last stage output (``feats[-1]``, the reference's ``feat[-2]``),
    ``f_t`` the map the teacher's classifier pools (the stage split's ``final_map``: the
    reference's ``feat[-2]`` for every teacher it uses; for a WRN teacher, absent from the
    reference, the map after the final BatchNorm-ReLU, so that the reused classifier gets what
    it was trained on), ``P`` a trainable bottleneck projector
    (:class:`topkd.models.wrappers.SimKDProjector`) to the teacher's width. The student
    classifies through ``P`` and the teacher's classifier: the evaluated and exported network
    is :class:`topkd.models.wrappers.SimKDNet` (student + projector + a frozen copy of the
    teacher's classifier; ``best.pt`` records it as the ``simkd`` wrapper so ``topkd eval``
    rebuilds it). The reference trains with the MSE alone
    (``-c 0 -d 0 -b 1``): ``ce`` defaults to 0, and a CE term, if asked for, applies to the
    student's own classifier as in the reference. Accuracies, ``train_acc1`` included, are the
    SimKD network's, as in the reference (``train_distill`` sets ``logit_s = pred_feat_s``
    before its accuracy; the student's own head, which the MSE alone never trains, is at
    chance).
    """

    Params = SimKDParams
    paper = ("Chen et al., 'Knowledge Distillation with the Reused Teacher Classifier', "
             "CVPR 2022")
    code = "DefangChen/SimKD: models/util.py (SimKD), helper/loops.py"
    student_taps = ("feats",)
    teacher_taps = ("feats", "preact_feats")  # the teacher's final map: per family, see stages
    trainable_modules = True

    def __init__(self, params: SimKDParams | None = None, ctx: MethodContext | None = None):
        super().__init__(params, ctx)
        from topkd.models.stages import stage_split
        from topkd.models.wrappers import SimKDProjector

        if ctx is None or ctx.teacher is None or ctx.input_size is None:
            raise ValueError("simkd needs the teacher model (its classifier is reused) and the "
                             "models' feature shapes: build it with a MethodContext holding the "
                             "student, the teacher and the input size")
        split_t = stage_split(ctx.teacher)
        (s_c, s_h, _) = ctx.feature_shapes("student", ("feats",))["feats"][-1]
        (t_c, t_h, _) = split_t.shapes(ctx.input_size)[-1]
        head = split_t.classifier
        if not isinstance(head, nn.Linear) or head.in_features != t_c:
            raise ValueError(f"simkd: the teacher's classifier must be a Linear over its final "
                             f"map's {t_c} channels (the reused classifier), got {head}")
        self.teacher_taps = split_t.taps
        self._split_t = {"teacher": split_t}  # the engine's teacher: not one of our modules
        self.projector = SimKDProjector(s_c, t_c, self.params.factor)
        #: A frozen copy of the teacher's classifier: saved with the method and exported.
        self.head = copy.deepcopy(head).requires_grad_(False)
        #: The student map is pooled to the teacher's size when larger (simkd_align).
        self.pool_to = t_h if s_h > t_h else None
        self._nets: dict[int, nn.Module] = {}  # eval networks per student (not submodules)

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        teacher = batch.teacher
        assert teacher is not None
        final_t = self._split_t["teacher"].final_map(teacher.feats)
        source, target = simkd_align(  # fp32 under AMP (the projector's dtype)
            as_compute(batch.student.feats["feats"][-1]), as_compute(final_t))
        projected = self.projector(source)
        terms["feat"] = simkd_loss(projected, target)
        # Training accuracy of the evaluated network (SimKDNet), not of the unused student head.
        batch.eval_logits = self.head(projected.detach().mean((2, 3)))
        return self.params.feat_weight * terms["feat"]

    def eval_model(self, student: nn.Module) -> nn.Module:
        """:class:`~topkd.models.wrappers.SimKDNet` around ``student`` (this method's projector
        and head; built once per student)."""
        from topkd.models.wrappers import SimKDNet

        net = self._nets.get(id(student))
        if net is None or net.student is not student:
            net = SimKDNet(student, self.projector, self.head, self.pool_to)
            self._nets[id(student)] = net
        return net
