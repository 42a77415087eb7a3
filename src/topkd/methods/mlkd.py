"""MLKD (Jin et al., CVPR 2023): multi-level logit distillation on a weak and a strong view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as TF
from torch import Tensor

from topkd.losses import functional as F
from topkd.losses._validate import as_compute, check_positive, prepare
from topkd.losses.functional import autocast_off

from ._logit import logit_rows
from .base import Batch, Method, ModelOutput, cross_entropy
from .params import MethodParams, param
from .registry import register_method

__all__ = ["MLKD", "MLKDParams", "MLKDTerms", "TEMPERATURES_AFTER_FIRST", "mlkd_loss"]

#: The reference's temperature set is ``(T, 3, 5, 2, 6)``: ``T`` is its config's
#: ``KD.TEMPERATURE``, the other four are written in the code.
TEMPERATURES_AFTER_FIRST = (3.0, 5.0, 2.0, 6.0)
#: Positions in the set whose strong-view instance-level term the reference computes on the
#: weak view (the temperatures 2 and 6 of ``(T, 3, 5, 2, 6)``).
_WEAK_IN_STRONG = (3, 4)

Masking = Literal["scale", "select"]
StrongKD = Literal["mixed", "strong"]


class MLKDTerms(NamedTuple):
    """The three levels, each summed over the temperatures, before ``kd_weight``.

    ``kd`` (instance level): the masked weak-view and the strong-view KD terms; ``cc`` (class
    level) and ``bc`` (batch level): the masked weak-view Gram-matrix terms.
    """

    kd: Tensor
    cc: Tensor
    bc: Tensor


def _temperatures(temperature: float, like: Tensor) -> Tensor:
    return torch.tensor((float(temperature), *TEMPERATURES_AFTER_FIRST), dtype=like.dtype,
                        device=like.device).view(-1, 1, 1)


def _kd_rows(s: Tensor, t: Tensor, T: Tensor) -> Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))`` per row for every temperature: ``(K, N)``."""
    log_ps, log_pt = TF.log_softmax(s / T, -1), TF.log_softmax(t / T, -1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1) * T.view(-1, 1) ** 2


def _gram_sq(ps: Tensor, pt: Tensor, classes: bool) -> Tensor:
    """Squared differences of the teacher and student Gram matrices, ``(K, M, M)``.

    ``classes``: ``P^T P`` (``M = C``, class level), else ``P P^T`` (``M = N``, batch level).
    """
    if classes:
        gs, gt = ps.transpose(1, 2) @ ps, pt.transpose(1, 2) @ pt
    else:
        gs, gt = ps @ ps.transpose(1, 2), pt @ pt.transpose(1, 2)
    return (gt - gs) ** 2


def _masked(per_entry: Tensor, mask: Tensor, norm: int, masking: str) -> Tensor:
    """Sum over ``K`` of a masked level term. ``per_entry`` is ``(K, N)`` (summed over its last
    dim) or ``(K, M, M)`` (``mask`` indexes the last dim, as the reference's broadcast)."""
    m = mask.to(per_entry.dtype)
    dims = tuple(range(1, per_entry.dim()))
    if masking == "scale":  # the reference: a batch value times the masked fraction
        return per_entry.sum(dims).sum() / norm * m.mean()
    return (per_entry * m).sum(dims).sum() / norm


@autocast_off
def mlkd_loss(s_weak: Tensor, t_weak: Tensor, s_strong: Tensor, t_strong: Tensor,
              temperature: float = 4.0, *, ls: bool = False, masking: Masking = "scale",
              strong_kd: StrongKD = "mixed", validate: bool = True) -> MLKDTerms:
    r"""The instance-, class- and batch-level terms of MLKD (without CE and weights).

    With ``P_T = softmax(z / T)`` over the temperatures ``T in (temperature, 3, 5, 2, 6)``,
    ``KD_T = T^2 KL(P_T(t) || P_T(s))`` per sample, the teacher's weak-view confidences
    ``c_b = max_c softmax(t_weak)_bc`` and class sums ``k_c = sum_b softmax(t_weak)_bc``, the
    masks ``m_b = [c_b <= median(c)]`` and ``n_c = [k_c <= median(k)]``:

    .. math::
        kd &= \sum_T \langle KD_T(s_w, t_w) \rangle_m + \sum_T \overline{KD_T}(s_s, t_s)\\
        cc &= \sum_T \langle \| P_T(t_w)^\top P_T(t_w) - P_T(s_w)^\top P_T(s_w) \|^2 / C
              \rangle_n\\
        bc &= \sum_T \langle \| P_T(t_w) P_T(t_w)^\top - P_T(s_w) P_T(s_w)^\top \|^2 / B
              \rangle_m

    This is ``forward_train`` of Jin-Ying/Multi-Level-Logit-Distillation
    ``mdistiller/distillers/KD_ours.py`` (and of the logit-standardization repository's
    ``MLKD.py``, identical but for LS), with its quirks kept by default:

    * **masks scale, they do not select** (``masking="scale"``): the reference multiplies each
      *batch-mean* term by the mask vector and takes the mean, so ``<x>_m = x * mean(m)``: a
      masked term is its full-batch value times the masked fraction (about 1/2).
      ``masking="select"``: the masks select entries (the code's commented-out
      ``reduce=False`` path, normalised like the unmasked term): ``sum_b m_b KD_b / B``, and
      the Gram terms summed over the masked columns only.
    * **strong-view KD at T = 2 and 6 uses the weak logits** (``strong_kd="mixed"``), a
      copy-paste slip of the reference: its strong sum is ``KD_T(s_s, t_s)`` for the first
      three temperatures and ``KD_T(s_w, t_w)`` (unmasked) for the last two.
      ``strong_kd="strong"``: all five on the strong view.
    * the reference also computes strong-view class- and batch-level terms but never adds them
      to the loss; they are not computed here.

    ``ls``: logit standardization of student and teacher logits inside every instance-level
    term (the LS code's ``--logit-stand``); the masks and Gram terms use the raw logits, as
    there. Medians are numpy's ``percentile(.., 50)`` (linear interpolation), here
    :func:`torch.quantile` on the device (no host sync).

    Args:
        s_weak, t_weak, s_strong, t_strong: ``(B, C)`` logits of the student and teacher on the
            weak and strong view of the same images (teachers detached inside).
        temperature: the first temperature of the set, ``> 0`` (the reference's
            ``KD.TEMPERATURE``).
        ls, masking, strong_kd: as above.
        validate: check the logits for NaN/inf (one host sync).

    Returns:
        :class:`MLKDTerms` ``(kd, cc, bc)``, scalars.
    """
    fn = "mlkd_loss"
    check_positive(fn, "temperature", temperature)
    if masking not in ("scale", "select"):
        raise ValueError(f"{fn}: masking must be 'scale' or 'select', got {masking!r}")
    if strong_kd not in ("mixed", "strong"):
        raise ValueError(f"{fn}: strong_kd must be 'mixed' or 'strong', got {strong_kd!r}")
    for what, x in (("weak", s_weak), ("strong", s_strong)):
        if x.dim() != 2:
            raise ValueError(f"{fn}: {what}-view logits must be (B, C), got {tuple(x.shape)}")
    if s_strong.shape != s_weak.shape:
        raise ValueError(f"{fn}: the strong view's logits {tuple(s_strong.shape)} must have the "
                         f"weak view's shape {tuple(s_weak.shape)} (the same images)")
    w = prepare(fn, s_weak, t_weak, validate=validate)
    st = prepare(fn, s_strong, t_strong, validate=validate)
    sw, tw, ss, ts = (as_compute(x) for x in (w.s, w.t, st.s, st.t))
    return _mlkd_terms(sw, tw, ss, ts, temperature, ls, masking, strong_kd)


def _mlkd_terms(sw: Tensor, tw: Tensor, ss: Tensor, ts: Tensor, temperature: float, ls: bool,
                masking: str, strong_kd: str) -> MLKDTerms:
    B, C = sw.shape
    T = _temperatures(temperature, sw)
    # Masks from the teacher's weak view at T=1 (raw logits, also under LS).
    pt1 = TF.softmax(tw, -1)
    conf = pt1.amax(-1)
    mask = conf <= torch.quantile(conf, 0.5)
    class_conf = pt1.sum(0)
    class_mask = class_conf <= torch.quantile(class_conf, 0.5)

    # Instance level: every temperature at once, (K, B).
    std = F.standardize if ls else (lambda z: z)
    kd_w = _kd_rows(std(sw), std(tw), T)
    kd_s = _kd_rows(std(ss), std(ts), T)
    if strong_kd == "mixed":
        weak_pos = torch.zeros(T.shape[0], 1, dtype=torch.bool, device=sw.device)
        weak_pos[list(_WEAK_IN_STRONG)] = True
        kd_s = torch.where(weak_pos, kd_w, kd_s)
    kd = _masked(kd_w, mask, B, masking) + kd_s.mean(-1).sum()

    # Class and batch level on the weak view, (K, C, C) and (K, B, B).
    ps, pt = TF.softmax(sw / T, -1), TF.softmax(tw / T, -1)
    cc = _masked(_gram_sq(ps, pt, classes=True), class_mask, C, masking)
    bc = _masked(_gram_sq(ps, pt, classes=False), mask, B, masking)
    return MLKDTerms(kd, cc, bc)


@dataclass(frozen=True)
class MLKDParams(MethodParams):
    ce: float = param(0.1, "weight of cross-entropy on each of the two views",
                      check="nonneg")
    kd_weight: float = param(0.9, "weight of every instance-, class- and batch-level term",
                             check="pos")
    temperature: float = param(4.0, "first temperature of the set (T, 3, 5, 2, 6); the other "
                                     "four are fixed, as in the reference", check="pos")
    ls: bool = param(False, "logit standardization in the instance-level terms (the LS code's "
                            "--logit-stand)")
    masking: Masking = param("scale", "'scale': a masked term is its batch value times the "
                                      "masked fraction (reference); 'select': masks select "
                                      "samples / classes")
    strong_kd: StrongKD = param("mixed", "'mixed': the strong-view KD terms at T=2 and 6 use "
                                         "the weak logits (reference); 'strong': all on the "
                                         "strong view")


@register_method("mlkd")
class MLKD(Method):
    r"""Multi-level logit distillation on a weak and a strong view of each image:
    ``ce * (CE(s_w, y) + CE(s_s, y)) + warm * kd_weight * (kd + cc + bc)``.

    ``kd``, ``cc``, ``bc`` are :func:`mlkd_loss`'s instance-, class- and batch-level terms over
    the temperatures ``(temperature, 3, 5, 2, 6)``, with the teacher-confidence masks of the
    weak view. The main view of the batch is the weak one (standard crop + flip); the strong
    view (``batch.views["strong"]``: in the reference an independent crop + flip of the same
    image followed by its FixMatch-style RandAugment(2, 10) and Cutout) is run through student
    and teacher by the engine.

    CIFAR-100 reference (Jin-Ying/Multi-Level-Logit-Distillation, ``configs/cifar100/ours/``
    with its ``cfg.py``): T 4, ce 0.1, kd 0.9, lr 0.025 (0.01 for light students), 240 epochs
    (480 or 960 for some cross-architecture pairs) with the lr steps still at 150/180/210.
    """

    Params = MLKDParams
    paper = "Jin et al., 'Multi-level Logit Distillation', CVPR 2023"
    code = "Jin-Ying/Multi-Level-Logit-Distillation: mdistiller/distillers/KD_ours.py"
    extra_views = ("strong",)

    def _strong(self, batch: Batch) -> tuple[ModelOutput, ModelOutput | None]:
        view = batch.views.get("strong")
        if view is None:
            raise ValueError(
                f"method {self.name!r} needs the strong view of every image: "
                "batch.views['strong'] = (student output, teacher output) on the strongly "
                f"augmented images (the engine provides it for methods with extra_views); "
                f"got views {sorted(batch.views)}")
        if view[0].logits.shape != batch.student.logits.shape:
            raise ValueError(f"{self.name}: the strong view's logits {tuple(view[0].logits.shape)}"
                             " must have the main (weak) view's shape "
                             f"{tuple(batch.student.logits.shape)}: the same images")
        return view

    def task_loss(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        """``ce * (CE(weak) + CE(strong))``; records ``ce`` and ``ce_strong`` (unweighted)."""
        strong, _ = self._strong(batch)
        ce = [cross_entropy(out.logits, batch.labels, self.params.ignore_index,
                            validate=self.validate, fn=self.name)
              for out in (batch.student, strong)]
        terms["ce"], terms["ce_strong"] = ce
        return self.params.ce * (ce[0] + ce[1])

    def distill(self, batch: Batch, terms: dict[str, Tensor]) -> Tensor:
        p = self.params
        strong, t_strong = self._strong(batch)
        if t_strong is None:
            raise ValueError(f"method {self.name!r} needs the teacher's outputs on the strong "
                             "view (a teacher-logit cache cannot provide them)")
        y = batch.labels
        w = logit_rows(self.name, batch.student.logits, batch.teacher.logits, y,
                       p.ignore_index, self.validate)
        s = logit_rows(self.name, strong.logits, t_strong.logits, y, p.ignore_index,
                       self.validate)
        sw, tw, ss, ts = w.s, w.t, s.s, s.t
        if w.keep is not None:  # ignored rows leave the batch (a host sync, only then)
            sw, tw, ss, ts = (x[w.keep] for x in (sw, tw, ss, ts))
            if sw.shape[0] == 0:
                return batch.student.logits.sum() * 0.0
        out = _mlkd_terms(sw, tw, ss, ts, p.temperature, p.ls, p.masking, p.strong_kd)
        terms["kd"], terms["cc"], terms["bc"] = out
        return p.kd_weight * (out.kd + out.cc + out.bc)
