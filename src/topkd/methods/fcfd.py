"""FCFD (Liu et al., ICLR 2023): function-consistent feature distillation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topkd.losses import functional as LF
from topkd.losses._validate import as_compute

from .base import Batch, Method, MethodContext
from .params import MethodParams, param
from .registry import register_method

__all__ = ["FCFD", "FCFDParams", "fcfd_bridge", "fcfd_candidate_paths", "fcfd_stage_l2"]


def fcfd_stage_l2(values: Sequence[Tensor], target: Tensor, final: bool) -> Tensor:
    r"""FCFD's L2 terms of one stage, in the teacher's feature space.

    ``sum_v MSE(v, t)`` over the stage's teacher-space tensors ``v`` (the bridged student
    feature: the appearance term; the teacher's stage outputs on the mixed paths: the function
    terms), plus at the last stage ``sum_v MSE(gap(relu(v)), gap(relu(t)))`` with ``gap`` the
    global average pool (reference ``train_one_epoch``, LiuDongyang6/FCFD
    ``classification/cifar/main.py``). MSE is the mean over every element.

    Args:
        values: tensors of the target's shape.
        target: the teacher's stage output (detached here).
        final: the stage is the last one.
    """
    if not values:
        raise ValueError("fcfd_stage_l2: no tensors to compare")
    target = target.detach()
    loss = sum(F.mse_loss(v, target) for v in values)
    if final:
        pooled = torch.flatten(F.adaptive_avg_pool2d(F.relu(target), 1), 1)
        loss = loss + sum(F.mse_loss(torch.flatten(F.adaptive_avg_pool2d(F.relu(v), 1), 1),
                                     pooled) for v in values)
    return loss  # type: ignore[return-value]


def fcfd_bridge(c_in: int, h_in: int, c_out: int, h_out: int, after_relu: bool) -> nn.Sequential:
    """FCFD's bridge from one network's stage output to the other's (``MetaModel.build_bridge``).

    ``conv3x3(stride 1, no bias)-BN``; a stride-2 conv (with bias, as the reference) when the
    source map is twice as large, a ``ConvTranspose2d(4, stride 2)`` when half as large; a
    ``LeakyReLU(0.1)`` when the target's stage outputs are post-ReLU. Convs get the reference's
    He (fan-out) initialisation; the transposed conv PyTorch's default.
    """
    if h_in == h_out:
        conv: nn.Module = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)
    elif h_in == 2 * h_out:
        conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
    elif 2 * h_in == h_out:
        conv = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
    else:
        raise ValueError(f"fcfd: cannot bridge a {h_in}x{h_in} stage output to {h_out}x{h_out} "
                         "(the sizes must be equal or differ by a factor of 2)")
    layers = [conv, nn.BatchNorm2d(c_out)]
    if after_relu:
        layers.append(nn.LeakyReLU(negative_slope=0.1))
    bridge = nn.Sequential(*layers)
    for m in bridge.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return bridge


def fcfd_candidate_paths(num_stages: int, extra_type: str) -> list[tuple[str, int]]:
    """The reference's candidate mixed paths (``MetaModel._create_candidate_path``), as
    ``(direction, k)``: the first network runs stages ``0..k``, the other ``k+1..end`` on the
    bridged boundary ``k``. ``"t2s"`` starts in the teacher, ``"s2t"`` in the student."""
    ks = range(1, num_stages - 1)
    t2s = [("t2s", k) for k in ks]
    s2t = [("s2t", k) for k in ks]
    return {"bi": t2s + s2t, "t2s": t2s, "s2t": s2t}[extra_type]


_MIX = (lambda p: p.extra_paths > 0, "extra_paths > 0")


@dataclass(frozen=True)
class FCFDParams(MethodParams):
    ignore_index: int | None = param(None, "label value whose rows CE drops (the other terms "
                                           "use no labels)")
    kd_weight: float = param(1.0, "weight of the student's KD term to the teacher "
                                  "(loss_student.kl_student[0])", check="nonneg")
    mix_weight: float = param(1.0, "weight of each mixed path's KD term to the teacher "
                                   "(loss_mixture.kl_student[0])", check="nonneg", when=_MIX)
    temperature: float = param(4.0, "softmax temperature of the KD terms (T)", check="pos")
    l2_weight: float = param(5.0, "weight of the appearance and function L2 terms (weight_l2)",
                             check="nonneg")
    l2_warmup: float = param(20.0, "epochs of linear warm-up of the L2 terms only (the "
                                   "reference's min(1, epoch / 20))", check="nonneg")
    extra_paths: int = param(2, "mixed paths drawn per step (extra_paths; 0 = the reference's "
                                "'nomix')", check="nonneg")
    extra_type: Literal["bi", "s2t", "t2s"] = param(
        "bi", "directions of the mixed paths (extra_type)", when=_MIX)
    teacher_bn: Literal["batch", "running"] = param(
        "batch", "teacher BatchNorm: 'batch' statistics as the reference (its frozen teacher "
                 "stays in train mode), or its 'running' statistics")

    def _validate(self) -> None:
        from .params import ParamError

        if self.kd_weight == 0 and self.l2_weight == 0 and (
                self.extra_paths == 0 or self.mix_weight == 0):
            raise ParamError("method.kd_weight, method.l2_weight and the mixed paths' weight "
                             "are all 0: nothing is distilled")


@register_method("fcfd")
class FCFD(Method):
    r"""FCFD: ``ce * CE + warm * (kd_weight * KD(s, t) + mix_weight * sum_p KD(z_p, t)
    + ramp(epoch) * l2_weight * sum_i L2_i)``.

    Both networks are cut into FCFD's stages (:mod:`topkd.models.stages`). Trainable bridges map
    the student's stage outputs ``s_i`` to the teacher's space (``b_i``) and, for the
    teacher-to-student paths, the teacher's ``t_i`` to the student's. Each step draws
    ``extra_paths`` mixed paths: ``s2t`` at ``k`` runs the teacher's stages ``k+1..`` and head
    on ``b_k`` (function consistency: the student's features must work in the teacher), ``t2s``
    at ``k`` the student's on the bridged ``t_k``; each path's logits ``z_p`` are distilled
    from the teacher (KD, ``T^2`` scaled). ``L2_i`` (:func:`fcfd_stage_l2`) compares with
    ``t_i`` the bridged ``b_i`` and the teacher's stage-``i`` outputs on the ``s2t`` paths.
    ``ramp = min(epoch / l2_warmup, 1)`` applies to the L2 terms only, as the reference.

    Reference quirks reproduced: the frozen teacher runs in train mode (BatchNorm on batch
    statistics: ``teacher_bn: batch``; the engine honours ``teacher_bn_batch_stats``); stages
    run on a mixed path leave the BatchNorm running statistics alone (the reference keeps
    separate, never-read statistics per path). Paths are drawn with torch's generator (the
    reference uses Python's ``random.sample``). The teacher-to-student bridge of the last
    stage, built but never used by the reference, is not built.
    """

    Params = FCFDParams
    paper = ("Liu et al., 'Function-Consistent Feature Distillation', ICLR 2023")
    code = "LiuDongyang6/FCFD: classification/models/meta.py, classification/cifar/main.py"
    # Per family the stage outputs are feats or preact_feats; instances keep what they use.
    student_taps = ("feats", "preact_feats")
    teacher_taps = ("feats", "preact_feats")
    trainable_modules = True
    #: Bridges of paths not drawn in a step get no gradient.
    ddp_find_unused_parameters = True

    def __init__(self, params: FCFDParams | None = None, ctx: MethodContext | None = None):
        super().__init__(params, ctx)
        from topkd.models.stages import stage_split

        if ctx is None or ctx.student is None or ctx.teacher is None or ctx.input_size is None:
            raise ValueError("fcfd runs parts of both networks: build it with a MethodContext "
                             "holding the student, the teacher and the input size")
        p = self.params
        split_s, split_t = stage_split(ctx.student), stage_split(ctx.teacher)
        n = split_s.num_stages
        if split_t.num_stages != n:
            raise ValueError(f"fcfd: the student has {n} stages, the teacher "
                             f"{split_t.num_stages}; FCFD pairs networks stage by stage (pick "
                             "a pair with as many stages)")
        shapes_s = split_s.shapes(ctx.input_size)
        shapes_t = split_t.shapes(ctx.input_size)
        self.paths = fcfd_candidate_paths(n, p.extra_type) if p.extra_paths else []
        if p.extra_paths > len(self.paths):
            raise ValueError(f"method.extra_paths={p.extra_paths}: a {n}-stage pair has "
                             f"{len(self.paths)} {p.extra_type} paths")

        def bridge(src: tuple[int, int, int], dst: tuple[int, int, int], relu: bool) -> nn.Module:
            return fcfd_bridge(src[0], src[1], dst[0], dst[1], relu)

        # s2t[i - 1]: student stage i -> teacher; t2s[k - 1]: teacher stage k -> student.
        self.s2t = nn.ModuleList(bridge(s, t, split_t.after_relu)
                                 for s, t in zip(shapes_s, shapes_t))
        need_t2s = {k for d, k in self.paths if d == "t2s"}
        self.t2s = nn.ModuleList(bridge(t, s, split_s.after_relu)
                                 for k, (s, t) in enumerate(zip(shapes_s, shapes_t), 1)
                                 if k in need_t2s)
        self.student_taps, self.teacher_taps = split_s.taps, split_t.taps
        self.teacher_bn_batch_stats = p.teacher_bn == "batch"
        # The models are the engine's, not this method's modules: kept out of the module tree.
        self._splits = {"student": split_s, "teacher": split_t}

    @property
    def num_stages(self) -> int:
        return self._splits["student"].num_stages

    def sample_paths(self) -> list[tuple[str, int]]:
        """``extra_paths`` distinct candidate paths, uniformly (torch's global generator)."""
        k = self.params.extra_paths
        if not k:
            return []
        return [self.paths[int(i)] for i in torch.randperm(len(self.paths))[:k]]

    def l2_ramp(self, epoch: float | None) -> float:
        w = self.params.l2_warmup
        if not w:
            return 1.0
        if epoch is None:
            raise ValueError(f"fcfd: epoch is required when l2_warmup={w} > 0")
        return min(float(epoch) / w, 1.0)

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        from topkd.models.stages import frozen_bn_stats

        p, n = self.params, self.num_stages
        split_s, split_t = self._splits["student"], self._splits["teacher"]
        teacher = batch.teacher
        assert teacher is not None
        s = {i: as_compute(split_s.boundary(batch.student.feats, i)) for i in range(1, n)}
        t = {i: as_compute(split_t.boundary(teacher.feats, i)).detach() for i in range(1, n)}
        b = {i: self.s2t[i - 1](s[i]) for i in range(1, n)}
        on_paths: dict[int, list[Tensor]] = {i: [] for i in range(1, n)}
        mixed: list[Tensor] = []
        t2s_index = {k: j for j, k in enumerate(sorted({k for d, k in self.paths
                                                        if d == "t2s"}))}
        for direction, k in self.sample_paths():
            if direction == "s2t":  # the teacher's later stages on the bridged student feature
                x = b[k]
                with frozen_bn_stats(split_t.model, batch_stats=self.teacher_bn_batch_stats):
                    for i in range(k + 1, n):
                        x = split_t.stages[i](x)
                        on_paths[i].append(x)
                    mixed.append(split_t.head(x))
            else:  # the student's later stages on the bridged teacher feature
                x = self.t2s[t2s_index[k]](t[k])
                with frozen_bn_stats(split_s.model):
                    mixed.append(split_s.run(x, k + 1))
        t_logits = as_compute(teacher.logits)
        terms["kd"] = LF.kd_loss(as_compute(batch.student.logits), t_logits, p.temperature,
                                 validate=False)
        terms["l2"] = sum(fcfd_stage_l2([b[i], *on_paths[i]], t[i], final=i == n - 1)
                          for i in range(1, n))  # type: ignore[assignment]
        loss = p.kd_weight * terms["kd"] + self.l2_ramp(batch.epoch) * p.l2_weight * terms["l2"]
        if mixed:
            terms["mix_kd"] = sum(LF.kd_loss(z, t_logits, p.temperature, validate=False)
                                  for z in mixed)  # type: ignore[assignment]
            loss = loss + p.mix_weight * terms["mix_kd"]
        return loss
