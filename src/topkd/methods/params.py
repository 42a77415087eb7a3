"""Typed, frozen parameter dataclasses for distillation methods.

Every method declares one :class:`MethodParams` subclass whose fields are its parameters with the
reference defaults. Each field is declared with :func:`param`, which records

* ``doc``: one line for ``topkd methods`` and ``docs/methods.md``;
* ``check``: a value rule (``"pos"`` > 0, ``"nonneg"`` >= 0, ``"int1"`` int >= 1, ``"unit"``
  in [0, 1], ``"unit_open"`` in [0, 1)) checked on construction;
* ``when``: ``(predicate, reason)``: the field only has an effect when ``predicate(params)``
  holds. Setting it otherwise (given explicitly, or different from its default) is an error that
  says why — topkd accepts no setting without an effect — and :meth:`to_dict` leaves it out.

Sections (``tsm``, ``tdl``, ...) are nested :class:`Params` dataclasses or ``None`` (= off); in a
config ``tsm: {}`` or ``tsm: true`` turns a section on with its defaults, ``tsm: null`` or
``tsm: false`` turns it off.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

__all__ = ["MethodParams", "Params", "ParamError", "param"]

_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "pos": (lambda v: v > 0, "a number > 0"),
    "nonneg": (lambda v: v >= 0, "a number >= 0"),
    "int1": (lambda v: v >= 1, "an integer >= 1"),
    "unit": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "unit_open": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


class ParamError(ValueError):
    """A bad method parameter: unknown key, bad value, or a setting without an effect."""


def param(default: Any, doc: str, *, check: str | None = None,
          when: tuple[Callable[[Any], bool], str] | None = None) -> Any:
    """A dataclass field with the metadata described in the module docstring."""
    if check is not None and check not in _CHECKS:
        raise ValueError(f"unknown check {check!r}")
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check, "when": when})


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is tuple:
        return "a list of numbers"
    if isinstance(tp, type) and issubclass(tp, Params):
        return f"a mapping of {{{', '.join(tp.field_names())}}} (or true/false)"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


class Params:
    """Validation machinery shared by method parameters and their sections (a mixin).

    Subclasses are ``@dataclass(frozen=True)``. ``_where`` names their config path in errors
    (``"method"``, or ``"method.tsm"`` for a section); ``_rejected`` maps keys that a user
    might expect but that have no effect for this method to the reason (e.g. LS under TopKD).
    """

    _where: ClassVar[str] = "method"
    _rejected: ClassVar[dict[str, str]] = {}

    # ---- introspection
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def fields_info(cls) -> list[tuple[str, Any, Any, str]]:
        """``(name, type, default, doc)`` of every field, in declaration order."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            out.append((f.name, hints[f.name], f.default, f.metadata.get("doc", "")))
        return out

    # ---- construction
    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = _coerce(getattr(self, f.name), hints[f.name], self._key(f.name))
            object.__setattr__(self, f.name, v)
            check = f.metadata.get("check")
            if check is not None and v is not None and not isinstance(v, Params):
                ok, what = _CHECKS[check]
                if not ok(v):
                    raise ParamError(f"invalid value for {self._key(f.name)!r}: {v!r}; "
                                     f"expected {what}")
        self._validate()
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            when = f.metadata.get("when")
            if when is not None and not when[0](self) and getattr(self, f.name) != f.default:
                raise self._no_effect(f.name, getattr(self, f.name), when[1])

    def _validate(self) -> None:
        """Cross-field checks of a subclass (raise :class:`ParamError`)."""

    def _key(self, name: str) -> str:
        return f"{self._where}.{name}"

    def _no_effect(self, name: str, value: Any, reason: str) -> ParamError:
        return ParamError(f"{self._key(name)}={value!r} has no effect here: it applies only "
                          f"when {reason}. Remove it (topkd accepts no setting without an effect).")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Params:
        """Build from a mapping, rejecting unknown keys (with did-you-mean) and, for keys given
        explicitly, settings without an effect even when equal to the default."""
        where = cls._where
        if not isinstance(d, Mapping):
            raise ParamError(f"{where!r} must be a mapping, got {d!r}")
        names = cls.field_names()
        hints = typing.get_type_hints(cls)
        kw: dict[str, Any] = {}
        for key, value in d.items():
            if key in cls._rejected:
                raise ParamError(f"{where}.{key} is not accepted here: {cls._rejected[key]}")
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                for sec in names:  # a section's parameter given at the top level
                    st = _strip_optional(hints[sec])
                    if isinstance(st, type) and issubclass(st, Params) and \
                            key in st.field_names():
                        hint = f" (it is a parameter of the section {where}.{sec}: set " \
                               f"{where}.{sec}.{key})"
                raise ParamError(f"unknown key {where}.{key}{hint}; allowed keys: "
                                 f"{', '.join(names)}")
            tp = _strip_optional(hints[key])
            if isinstance(tp, type) and issubclass(tp, Params):
                value = _section(tp, value)
            kw[key] = value
        obj = cls(**kw)
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            when = f.metadata.get("when")
            if f.name in d and when is not None and not when[0](obj):
                raise obj._no_effect(f.name, getattr(obj, f.name), when[1])
        return obj

    def relevant(self, name: str) -> bool:
        f = next(f for f in dataclasses.fields(self) if f.name == name)  # type: ignore[arg-type]
        when = f.metadata.get("when")
        return when is None or bool(when[0](self))

    def to_dict(self) -> dict[str, Any]:
        """The fields that have an effect (sections as nested mappings, ``None`` when off)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not self.relevant(f.name):
                continue
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Params) else (
                list(v) if isinstance(v, tuple) else v)
        return out

    def replace(self, **changes: Any) -> Params:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _section(tp: type, value: Any) -> Any:
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if isinstance(value, Params):
        return value
    if not isinstance(value, Mapping):
        raise ParamError(f"invalid value for {tp._where!r}: {value!r}; "  # type: ignore[attr-defined]
                         f"expected {_type_name(tp)}")
    return tp.from_dict(value)  # type: ignore[attr-defined]


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (YAML-friendly: ints for floats, etc.)."""
    def bad() -> ParamError:
        return ParamError(f"invalid value for {key!r}: {value!r}; expected {_type_name(tp)}")

    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ParamError:
                pass
        raise bad()
    if isinstance(tp, type) and issubclass(tp, Params):
        if isinstance(value, tp):
            return value
        if isinstance(value, (Mapping, bool)):
            return _section(tp, value)
        raise bad()
    if origin is Literal:
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise bad()
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if origin is tuple:
        (elem, *_) = get_args(tp)
        if not isinstance(value, (list, tuple)) or not value:
            raise bad()
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"unsupported parameter type {tp!r} for {key}")  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class MethodParams(Params):
    """Parameters every method has: the CE weight, the distillation warm-up, ``ignore_index``.

    The total loss of a method is ``ce * CE(student, y) + warm(epoch) * distillation`` with
    ``warm(epoch) = min(epoch / warmup, 1)`` (epochs count from 1; ``warmup = 0``: always 1).
    Subclasses redeclare ``ce`` / ``warmup`` to give their reference defaults.
    """

    ce: float = param(1.0, "weight of cross-entropy on the student logits", check="nonneg")
    warmup: float = param(0.0, "epochs of linear warm-up of the distillation terms (0 = none)",
                          check="nonneg")
    ignore_index: int | None = param(None, "label value whose rows every term drops")

    def warmup_factor(self, epoch: float | None) -> float:
        """``min(epoch / warmup, 1)``; epochs count from 1 (``warmup=0``: always 1)."""
        if not self.warmup:
            return 1.0
        if epoch is None:
            raise ValueError(f"{self._where}: epoch is required when warmup={self.warmup} > 0")
        if epoch < 0:
            raise ValueError(f"{self._where}: epoch must be >= 0 (counts from 1), got {epoch}")
        return min(float(epoch) / float(self.warmup), 1.0)
