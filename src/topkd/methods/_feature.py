"""Shared pieces of the feature-based methods."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from topkd.losses._validate import as_compute

from .params import param

__all__ = ["compute_feats", "no_ignore_index"]


def compute_feats(x: Tensor | list[Tensor]) -> Any:
    """Features of an autocast forward (bf16/fp16) upcast to float32: the method's modules hold
    float32 weights and run outside autocast (other dtypes pass unchanged)."""
    return [as_compute(t) for t in x] if isinstance(x, (list, tuple)) else as_compute(x)


def no_ignore_index() -> Any:
    """``ignore_index`` for methods whose feature terms cannot drop rows: setting it is an error
    (its CE-only effect would contradict "every term drops those rows")."""
    return param(None, "not supported: the feature terms use every row",
                 when=(lambda p: False, "a method drops those rows from every term (the logit "
                                        "methods); this method's feature terms use every row"))
