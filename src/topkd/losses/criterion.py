"""The composable criterion: :class:`LossSpec` (what to compute) and :class:`DistillationLoss`.

``total = ce * CE(s, y) + warm(epoch) * (base_weight * BASE + tdl_weight * TDL + con_weight * CON)``

* ``ls``: both logits are standardized first (CE keeps the raw student logits, as in the LS
  code); the teacher used by every distillation term is ``standardize(t)``.
* ``tsm``: the teacher logits seen by the base loss and by the extra TDL/contrastive terms are
  ``tsm(t)`` (for ``base="topkd"`` it is TopKD's own ``use_tsm``).
* ``warm(epoch) = min(epoch / warmup, 1)`` (epochs count from 1; ``warmup=0`` disables it)
  multiplies every term except CE.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from ..registry import Registry
from . import functional as F
from ._validate import SCHEDULES, as_compute, prepare, reduce_rows

__all__ = ["LossSpec", "DistillationLoss", "METHODS", "BASES"]

BASES = ("none", "kd", "dkd", "topkd")
_FLOATS_POS = ("temperature", "tau")
_FLOATS_NONNEG = (
    "ce", "base_weight", "dkd_alpha", "dkd_beta", "gamma", "lam", "w_con", "w_tdl",
    "tdl_weight", "tdl_alpha", "tdl_beta", "con_weight", "warmup",
)  # fmt: skip
_BOOLS = ("ls", "tsm", "correct_gt")


@dataclass(frozen=True)
class LossSpec:
    """What :class:`DistillationLoss` computes. All weights are explicit; defaults = plain CE.

    Attributes:
        ce: weight of cross-entropy on the raw student logits (never warmed up).
        base: ``"none" | "kd" | "dkd" | "topkd"``: the main distillation loss.
        base_weight: its weight (KD's "kd weight"; DKD+LS uses 9 to scale alpha and beta).
        temperature: ``T`` of KD/DKD.
        dkd_alpha, dkd_beta: DKD's TCKD/NCKD weights.
        ls: logit standardization of student and teacher before every distillation term.
        tsm: TSM as teacher transform (``base="topkd"``: TopKD's ``use_tsm``).
        k, gamma, lam, correct_gt, schedule: TSM and TDL/TopKD parameters (``k`` is shared).
        w_con, w_tdl: TopKD's own term weights (``base="topkd"`` only).
        tdl_weight, tdl_alpha, tdl_beta: an extra TDL term on the (TSM) teacher (0 = off).
        con_weight: an extra contrastive term (0 = off); ``tau`` is its and TopKD's temperature.
        warmup: epochs of linear warm-up of every non-CE term (0 = none).
        ignore_index: label value whose rows every term drops (``None`` = no such label).
    """

    ce: float = 1.0
    base: str = "none"
    base_weight: float = 1.0
    temperature: float = 4.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    ls: bool = False
    tsm: bool = False
    k: int = 5
    gamma: float = 1.0
    lam: float = 0.5
    correct_gt: bool = True
    schedule: str = "linear"
    w_con: float = 1.0
    w_tdl: float = 1.0
    tdl_weight: float = 0.0
    tdl_alpha: float = 1.0
    tdl_beta: float = 0.5
    con_weight: float = 0.0
    tau: float = 0.1
    warmup: float = 0
    ignore_index: int | None = None

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, allowed: str) -> ValueError:
            return ValueError(f"LossSpec.{key}: expected {allowed}, got {value!r}")

        for key in _FLOATS_POS + _FLOATS_NONNEG:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(key, v, "a number")
            if key in _FLOATS_POS and not v > 0:
                raise bad(key, v, "a number > 0")
            if key in _FLOATS_NONNEG and not v >= 0:
                raise bad(key, v, "a number >= 0")
        for key in _BOOLS:
            if not isinstance(getattr(self, key), bool):
                raise bad(key, getattr(self, key), "true or false")
        if self.base not in BASES:
            raise bad("base", self.base, f"one of {', '.join(BASES)}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise bad("k", self.k, "an int >= 1")
        ii = self.ignore_index
        if ii is not None and (isinstance(ii, bool) or not isinstance(ii, int)):
            raise bad("ignore_index", ii, "an int or null")

    # ---- construction helpers
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LossSpec:
        """Build from a mapping (a config's ``loss:`` block), rejecting unknown keys.

        A ``"preset"`` key starts from :meth:`preset` (e.g. ``{"preset": "kd", "ce": 0.2}``).
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"LossSpec.from_dict: expected a mapping, got {type(d).__name__}")
        d = dict(d)
        preset = d.pop("preset", None)
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"LossSpec: unknown key {key!r}{hint}; allowed keys: {', '.join(names)}"
                )
        return cls.preset(preset, **d) if preset is not None else cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LossSpec:
        """A named method with the CIFAR defaults of docs/spec.md, e.g. ``preset("kd+tsm+tdl")``.

        Names (case-insensitive, ``_`` works as ``+``): see ``METHODS.names()``.
        """
        base = METHODS.get(str(name).lower().replace("_", "+"))()
        return dataclasses.replace(base, **overrides) if overrides else base

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> LossSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def has_distillation(self) -> bool:
        """Whether any term needs teacher logits."""
        return self.base != "none" or self.tdl_weight > 0 or self.con_weight > 0

    def warmup_factor(self, epoch: float | None) -> float:
        """``min(epoch / warmup, 1)``; epochs count from 1 (``warmup=0``: always 1)."""
        if not self.warmup:
            return 1.0
        if epoch is None:
            raise ValueError(f"DistillationLoss: epoch is required when warmup={self.warmup} > 0")
        if epoch < 0:
            raise ValueError(f"DistillationLoss: epoch must be >= 0 (counts from 1), got {epoch}")
        return min(float(epoch) / float(self.warmup), 1.0)


#: Named methods (CIFAR-100 defaults of docs/spec.md / configs/methods/*.yaml).
METHODS: Registry = Registry("loss method")


def _method(name: str, **kw: Any) -> None:
    METHODS.register(name)(lambda: LossSpec(**kw))


_KD = dict(ce=0.1, base="kd", base_weight=0.9, temperature=4.0)
_DKD = dict(ce=1.0, base="dkd", dkd_alpha=1.0, dkd_beta=8.0, temperature=4.0, warmup=20)
_TSM_TDL = dict(tsm=True, k=5, gamma=1.0, lam=0.5, correct_gt=True, tdl_weight=1.0)
_TOPKD = dict(ce=1.0, base="topkd", w_con=1.0, w_tdl=1.0, tau=0.1, k=5, tsm=True, warmup=20)
_method("ce", ce=1.0, base="none")
_method("kd", **_KD)
_method("dkd", **_DKD)
_method("kd+ls", **{**_KD, "ls": True, "temperature": 2.0, "base_weight": 9.0})
# LS code on DKD: T 2 and alpha, beta times 9 == base_weight 9 (configs/methods/dkd_ls.yaml)
_method("dkd+ls", **{**_DKD, "ls": True, "temperature": 2.0, "base_weight": 9.0})
_method("topkd", **_TOPKD)
_method("topkd+ls", **_TOPKD, ls=True)
_method("kd+tsm+tdl", **_KD, **_TSM_TDL)
_method("dkd+tsm+tdl", **_DKD, **_TSM_TDL)


class DistillationLoss(nn.Module):
    """Composable distillation criterion driven by a :class:`LossSpec`. No parameters.

    ``forward(student_logits, teacher_logits, labels, epoch=None) -> (total, terms)``.
    ``teacher_logits`` may be ``None`` only if ``not spec.has_distillation``. ``terms`` holds
    detached 0-d float tensors: the *unweighted* value of each computed loss (``"ce"``, the base
    name ``"kd" | "dkd" | "topkd"`` — with its own internal weights alpha/beta or w_con/w_tdl,
    but before ``base_weight`` and warm-up —, ``"topkd_con"``/``"topkd_tdl"`` for TopKD's two
    parts, ``"tdl"``/``"con"`` for the extra terms), the ``"warmup"`` factor, and
    ``"tsm_corrected"`` (fraction of rows whose label TSM raised) whenever TSM runs.
    Inputs are validated once per call (one host sync); ``validate=False`` skips the NaN/inf
    and label-range checks (shapes are still checked) for loops that watch the loss themselves.
    """

    def __init__(self, spec: LossSpec | Mapping[str, Any] | str | None = None, *,
                 validate: bool = True) -> None:
        super().__init__()
        self.validate = validate
        if spec is None:
            spec = LossSpec()
        elif isinstance(spec, str):
            spec = LossSpec.preset(spec)
        elif isinstance(spec, Mapping):
            spec = LossSpec.from_dict(spec)
        elif not isinstance(spec, LossSpec):
            raise ValueError(f"DistillationLoss: expected a LossSpec, got {type(spec).__name__}")
        self.spec = spec

    def extra_repr(self) -> str:
        d = LossSpec().to_dict()
        return ", ".join(f"{k}={v!r}" for k, v in self.spec.to_dict().items() if d[k] != v)

    @F.autocast_off
    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        labels: Tensor,
        epoch: float | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        sp = self.spec
        fn = "DistillationLoss"
        if sp.has_distillation and teacher_logits is None:
            raise ValueError(
                f"{fn}: teacher_logits is None but the spec has distillation terms "
                f"(base={sp.base!r}, tdl_weight={sp.tdl_weight}, con_weight={sp.con_weight})"
            )
        t_in = teacher_logits if sp.has_distillation else None
        ii = sp.ignore_index
        rows = prepare(fn, student_logits, t_in, labels, ignore_index=ii, need_labels=True,
                       validate=self.validate)
        C = rows.s.shape[-1]
        s = as_compute(rows.s)
        # integer labels with the ignore markers restored (the functionals re-derive `keep`)
        y = torch.where(rows.keep, rows.y, ii) if rows.keep is not None else rows.y
        kw = dict(ignore_index=ii, validate=False)
        terms: dict[str, Tensor] = {}

        # cross-entropy on raw student logits; probability labels give soft-target CE
        if labels.is_floating_point():
            ce_rows = -(as_compute(labels.detach()).reshape(-1, C) * TF.log_softmax(s, -1)).sum(-1)
        else:
            ce_rows = TF.cross_entropy(s, rows.y, reduction="none")
        ce = reduce_rows(ce_rows, rows.keep, rows.lead, "mean")
        terms["ce"] = ce
        total = sp.ce * ce
        if not sp.has_distillation:
            return total, {k: v.detach() for k, v in terms.items()}

        warm = sp.warmup_factor(epoch)
        t = as_compute(rows.t)
        if sp.ls:
            s, t = F.standardize(s), F.standardize(t)
        dist = s.new_zeros(())
        b, corrected = t, None
        if sp.tsm and (sp.base != "topkd" or sp.tdl_weight > 0 or sp.con_weight > 0):
            b, corrected = F.tsm(
                t, y, sp.k, sp.gamma, sp.lam, sp.correct_gt, sp.schedule,
                return_stats=True, **kw,
            )  # fmt: skip
        if sp.base == "kd":
            kd_rows = F.kd_loss(s, b, sp.temperature, reduction="none", validate=False)
            terms["kd"] = reduce_rows(kd_rows, rows.keep, rows.lead, "mean")
        elif sp.base == "dkd":
            terms["dkd"] = F.dkd_loss(
                s, b, y, sp.dkd_alpha, sp.dkd_beta, sp.temperature, **kw
            )  # fmt: skip
        elif sp.base == "topkd":
            con, tdl, corr, _ = F._topkd_parts(
                s, t, y, k=sp.k, tau=sp.tau, alpha=sp.tdl_alpha, beta=sp.tdl_beta,
                gamma=sp.gamma, lam=sp.lam, correct_gt=sp.correct_gt, use_tsm=sp.tsm,
                schedule=sp.schedule, need_con=sp.w_con != 0, need_tdl=sp.w_tdl != 0, fn=fn,
                **kw,
            )  # fmt: skip
            corrected = corr if corrected is None else corrected
            terms["topkd"] = sp.w_con * con + sp.w_tdl * tdl
            terms["topkd_con"], terms["topkd_tdl"] = con, tdl
        if sp.base != "none":
            dist = dist + sp.base_weight * terms[sp.base]
        if sp.tdl_weight > 0:
            terms["tdl"] = F.tdl_loss(s, b, sp.k, sp.tdl_alpha, sp.tdl_beta, y=y, **kw)
            dist = dist + sp.tdl_weight * terms["tdl"]
        if sp.con_weight > 0:
            terms["con"] = F.contrastive_loss(s, b, sp.tau, y=y, **kw)
            dist = dist + sp.con_weight * terms["con"]
        total = total + warm * dist
        out = {k: v.detach() for k, v in terms.items()}
        out["warmup"] = torch.tensor(warm, dtype=total.dtype, device=total.device)
        if corrected is not None:
            n = rows.keep.sum().clamp_min(1) if rows.keep is not None else max(corrected.numel(), 1)
            out["tsm_corrected"] = (corrected.sum() / n).to(total.dtype)
        return total, out
