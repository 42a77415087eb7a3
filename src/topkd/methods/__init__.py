"""Distillation methods: one registry, one small module per method.

>>> from topkd.methods import create_method, METHODS
>>> m = create_method({"name": "dkd", "beta": 8.0})
>>> out = m(student_logits, teacher_logits, labels, epoch=3)   # out.total, out.terms

Each method module defines a frozen parameter dataclass (reference defaults, documented) and a
:class:`Method` subclass registered with :func:`register_method`. Every module of this package
whose name does not start with ``_`` is imported on first use of the package, so adding a
method touches only its own module (plus its configs and tests). See ``docs/methods.md``.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Batch, LossOutput, Method, MethodContext, ModelOutput, cross_entropy
from .params import MethodParams, ParamError, Params, param
from .registry import (
    METHODS,
    create_method,
    method_class,
    method_name,
    params_from_dict,
    params_to_dict,
    register_method,
)

__all__ = [
    "METHODS",
    "Batch",
    "LossOutput",
    "Method",
    "MethodContext",
    "MethodParams",
    "ModelOutput",
    "ParamError",
    "Params",
    "create_method",
    "cross_entropy",
    "method_class",
    "method_name",
    "param",
    "params_from_dict",
    "params_to_dict",
    "register_method",
]

_SKIP = {"base", "params", "registry", "table"}
for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_") and _m.name not in _SKIP:
        importlib.import_module(f"{__name__}.{_m.name}")
