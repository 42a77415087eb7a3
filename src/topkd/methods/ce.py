"""Plain cross-entropy training (teachers, students trained alone): no distillation term."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method
from .params import MethodParams, param
from .registry import register_method

_NEVER = (lambda p: False, "the method distils (ce has no distillation term to warm up)")


@dataclass(frozen=True)
class CEParams(MethodParams):
    ce: float = param(1.0, "weight of cross-entropy", check="pos")
    warmup: float = param(0.0, "not used: ce has no distillation term", when=_NEVER)


@register_method("ce")
class CE(Method):
    """Cross-entropy only: ``ce * CE(s, y)``. Used by ``topkd train`` (no teacher)."""

    Params = CEParams
    paper = "-"
    code = "-"
    needs_teacher = False
