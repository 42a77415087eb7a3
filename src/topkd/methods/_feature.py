"""Shared pieces of the feature-based methods."""

from __future__ import annotations

from typing import Any

from .params import param

__all__ = ["no_ignore_index"]


def no_ignore_index() -> Any:
    """``ignore_index`` for methods whose feature terms cannot drop rows: setting it is an error
    (its CE-only effect would contradict "every term drops those rows")."""
    return param(None, "not supported: the feature terms use every row",
                 when=(lambda p: False, "a method drops those rows from every term (the logit "
                                        "methods); this method's feature terms use every row"))
