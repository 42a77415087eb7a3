"""The method registry: ``register_method``, ``create_method``, ``params_from_dict``."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from topkd.registry import Registry

from .params import MethodParams, ParamError

if TYPE_CHECKING:
    from .base import Method, MethodContext

__all__ = ["METHODS", "create_method", "method_class", "params_from_dict", "register_method"]

#: name -> :class:`Method` subclass.
METHODS: Registry[Any] = Registry("method")
_BY_PARAMS: dict[type, str] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a :class:`Method` subclass under ``name``.

    Its ``Params`` class must be its own (one parameter dataclass per method), so that a
    parameter object always knows which method it configures.
    """

    def deco(cls: type[Method]) -> type[Method]:
        key = name.lower()
        if cls.Params in _BY_PARAMS and _BY_PARAMS[cls.Params] != key:
            raise ValueError(f"method {key!r}: Params class {cls.Params.__name__} already "
                             f"belongs to method {_BY_PARAMS[cls.Params]!r}")
        METHODS.register(key)(cls)
        cls.name = key
        _BY_PARAMS[cls.Params] = key
        return cls

    return deco


def method_class(spec: str | MethodParams) -> type[Method]:
    """The :class:`Method` subclass of a name or of a parameter object."""
    if isinstance(spec, MethodParams):
        try:
            return METHODS.get(_BY_PARAMS[type(spec)])
        except KeyError:
            raise ValueError(f"{type(spec).__name__} is not the Params of a registered "
                             "method") from None
    return METHODS.get(str(spec))


def method_name(params: MethodParams) -> str:
    return method_class(params).name


def params_from_dict(d: Mapping[str, Any]) -> MethodParams:
    """Typed parameters from a config section ``{name: dkd, beta: 8.0, ...}``.

    Unknown keys, bad values and settings without an effect raise :class:`ParamError` naming
    the key (with a did-you-mean for misspellings).
    """
    if isinstance(d, MethodParams):
        return d
    if not isinstance(d, Mapping):
        raise ParamError(f"'method' must be a mapping with a 'name', got {d!r}")
    if "name" not in d:
        raise ParamError(f"'method' needs a 'name' (one of: {', '.join(METHODS.names())})")
    name = d["name"]
    try:
        cls = METHODS.get(str(name))
    except ValueError as e:
        raise ParamError(f"method.name: {e}") from None
    names = cls.Params.field_names()
    in_section = _section_fields(cls.Params)
    for key in d:
        if key == "name" or key in names or key in cls.Params._rejected or key in in_section:
            continue  # (a section's parameter at the top level: from_dict names the section)
        owners = [m for m in METHODS.names() if key in METHODS.get(m).Params.field_names()]
        if owners and not difflib.get_close_matches(str(key), names, n=1):
            raise ParamError(f"method.{key} is not a parameter of method {cls.name!r} (it is one "
                             f"of {', '.join(owners)}); 'topkd methods {cls.name}' lists its "
                             f"parameters: {', '.join(names)}")
    return cls.Params.from_dict({k: v for k, v in d.items() if k != "name"})


def _section_fields(params_cls: type[MethodParams]) -> set[str]:
    """Parameter names of the sections (``tsm``, ``tdl``...) of a parameter class."""
    import typing

    from .params import Params, _strip_optional

    out: set[str] = set()
    for tp in typing.get_type_hints(params_cls).values():
        tp = _strip_optional(tp)
        if isinstance(tp, type) and issubclass(tp, Params):
            out.update(tp.field_names())
    return out


def params_to_dict(params: MethodParams) -> dict[str, Any]:
    """``{"name": ..., **fields that have an effect}``: the inverse of :func:`params_from_dict`."""
    return {"name": method_name(params), **params.to_dict()}


def create_method(spec: str | Mapping[str, Any] | MethodParams, ctx: MethodContext | None = None,
                  *, num_classes: int | None = None) -> Method:
    """Build a method from a name (reference defaults), a config section or parameters.

    ``ctx`` gives what methods with trainable modules need to size them (models, input size);
    logit methods only need ``num_classes`` (or nothing).
    """
    from .base import MethodContext

    params = params_from_dict({"name": spec}) if isinstance(spec, str) else \
        params_from_dict(spec)
    if ctx is None and num_classes is not None:
        ctx = MethodContext(num_classes=num_classes)
    return method_class(params)(params, ctx)
