"""Generic checks over every registered method: no parameter without an effect, typed
parameters with clear errors, serialisation round-trips, ``topkd methods`` lists them."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, get_args, get_origin

import pytest
import torch

from method_examples import RICH, example, is_logit_only
from topkd.methods import (
    METHODS,
    MethodParams,
    ParamError,
    Params,
    create_method,
    method_class,
    params_from_dict,
    params_to_dict,
)
from topkd.methods.params import _strip_optional

torch.set_num_threads(1)


def _perturb(value: Any, tp: Any, name: str, check: str | None) -> Any:
    tp_s = _strip_optional(tp)
    if isinstance(tp_s, type) and issubclass(tp_s, Params):
        return tp_s() if value is None else None  # turn a section on / off
    if value is None:
        return 0 if tp_s is int else 0.5  # e.g. ignore_index None -> 0 (label 0 is present)
    if get_origin(tp_s) is Literal:
        return next(a for a in get_args(tp_s) if a != value)
    if tp_s is bool:
        return not value
    if tp_s is int:
        return value + 1
    if tp_s is float:
        if check in ("unit", "unit_open"):
            return value / 2 + 0.1
        if name == "warmup":
            return value + 2.0 if value else 2.0  # evaluated at epoch 1
        return value * 1.5 + 0.25
    if get_origin(tp_s) is tuple:
        return (*value[:-1], value[-1] * 1.5 + 0.25)
    raise AssertionError(f"no perturbation for {name}: {tp}")


def _paths(obj: Params, prefix: str = "") -> list[tuple[str, Params, dataclasses.Field, Any]]:
    """(dotted name, owner, field, type) of every relevant parameter, sections included."""
    hints = typing.get_type_hints(type(obj))
    out = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if not obj.relevant(f.name):
            continue
        out.append((prefix + f.name, obj, f, hints[f.name]))
        v = getattr(obj, f.name)
        if isinstance(v, Params):
            out += _paths(v, prefix + f.name + ".")
    return out


def _replace(params: Params, dotted: str, value: Any) -> Params:
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(params, **{head: value})  # type: ignore[type-var]
    return dataclasses.replace(  # type: ignore[type-var]
        params, **{head: _replace(getattr(params, head), rest, value)})


def _loss(params: MethodParams) -> torch.Tensor:
    torch.manual_seed(0)  # same module init / sampling for every variant
    method, batch = example(params)
    torch.manual_seed(1)
    return method(batch).total.detach()


def _rich(name: str) -> MethodParams:
    return params_from_dict({"name": name, **RICH.get(name, {})})


# Parameters that change only the gradient, and only at inputs unlike the generic example's:
# the named test (module, function) shows their effect.
GRADIENT_ONLY = {
    ("kdsvd", "svd_grad"): ("test_method_kdsvd", "test_kdsvd_safe_gradient_on_feature_maps"),
}


def test_gradient_only_parameters_have_their_own_test():
    import importlib

    for (name, param), (module, test) in GRADIENT_ONLY.items():
        assert param in METHODS.get(name).Params.field_names()
        assert callable(getattr(importlib.import_module(module), test)), (module, test)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_parameter_has_an_effect(name):
    """Perturbing any parameter (in a configuration where it applies) changes the loss
    (GRADIENT_ONLY: its gradient, shown by their own test)."""
    base = _rich(name)
    ref = _loss(base)
    assert torch.isfinite(ref)
    paths = _paths(base)
    assert paths, name
    for dotted, owner, f, tp in paths:
        if (name, dotted) in GRADIENT_ONLY:
            continue
        value = _perturb(getattr(owner, f.name), tp, f.name, f.metadata.get("check"))
        changed = _replace(base, dotted, value)
        got = _loss(changed)
        assert not torch.allclose(got, ref, rtol=1e-7, atol=1e-9), (
            f"{name}: {dotted} {getattr(owner, f.name)!r} -> {value!r} does not change the loss")


@pytest.mark.parametrize("name", METHODS.names())
def test_params_roundtrip_and_have_docs(name):
    cls = METHODS.get(name)
    assert cls.name == name and issubclass(cls.Params, MethodParams)
    assert method_class(cls.Params()) is cls
    for pname, _, _, doc in cls.Params.fields_info():
        assert doc, f"{name}.{pname} has no doc"
    for p in (cls.Params(), _rich(name)):
        d = params_to_dict(p)
        assert d["name"] == name and params_from_dict(d) == p
    assert cls.paper and cls.code and (cls.__doc__ or "").strip()
    if cls.needs_teacher:
        assert cls.distill is not MethodParams  # implemented
    example(cls.Params())  # every method has example inputs (tests/method_examples.py)


def test_logit_examples_cover_methods_without_extra_inputs():
    for name in METHODS.names():
        cls = METHODS.get(name)
        if is_logit_only(cls):
            continue
        from method_examples import EXAMPLES

        assert name in EXAMPLES, f"{name} needs an example builder"


@pytest.mark.parametrize("bad, match", [
    ({"name": "kdd"}, r"method.name: unknown method 'kdd'. Did you mean 'kd'"),
    ({}, r"'method' needs a 'name'"),
    ({"name": "kd", "temprature": 4}, r"unknown key method.temprature \(did you mean "
                                      r"'temperature'\?\)"),
    ({"name": "kd", "gamma": 1}, r"section method.tsm: set method.tsm.gamma"),
    ({"name": "kd", "temperature": 0}, r"'method.temperature': 0.0; expected a number > 0"),
    ({"name": "kd", "temperature": "hot"}, r"'method.temperature': 'hot'; expected a number"),
    ({"name": "kd", "ls": 1}, r"'method.ls': 1; expected true or false"),
    ({"name": "kd", "k": 3}, r"method.k=3 has no effect here: it applies only when tsm or tdl"),
    ({"name": "kd", "tsm": {"schedule": "cos"}},
     r"'method.tsm.schedule': 'cos'; expected one of 'linear', 'constant'"),
    ({"name": "kd", "tsm": 3}, r"'method.tsm': 3; expected a mapping of \{gamma"),
    ({"name": "kd", "tdl": {"weight": 0}}, r"'method.tdl.weight': 0.0; expected a number > 0"),
    ({"name": "dkd", "alpha": 0, "beta": 0}, r"alpha and method.beta are both 0"),
    ({"name": "topkd", "ls": True}, r"method.ls is not accepted here: logit standardization "
                                    r"does not change TopKD"),
    ({"name": "topkd", "temperature": 4}, r"TopKD has no softmax temperature"),
    ({"name": "topkd", "w_tdl": 0, "alpha": 1.0}, r"method.alpha=1.0 has no effect here: it "
                                                  r"applies only when w_tdl > 0"),
    ({"name": "topkd", "w_tdl": 0, "tsm": None, "k": 5}, r"method.k=5 has no effect"),
    ({"name": "topkd", "w_con": 0, "w_tdl": 0}, r"w_con and method.w_tdl are both 0"),
    ({"name": "topkd", "k": 0}, r"'method.k': 0; expected an integer >= 1"),
    ({"name": "ce", "warmup": 5}, r"method.warmup=5.0 has no effect here"),
    ({"name": "ce", "ce": 0}, r"'method.ce': 0.0; expected a number > 0"),
    ({"name": "dkd", "warmup": -1}, r"'method.warmup': -1.0; expected a number >= 0"),
])
def test_param_errors_name_the_key(bad, match):
    with pytest.raises(ParamError, match=match):
        params_from_dict(bad)


def test_no_effect_is_checked_for_python_construction_too():
    from topkd.methods.kd import KDParams

    with pytest.raises(ParamError, match="method.k=3 has no effect"):
        KDParams(k=3)  # different from the default and without tsm/tdl
    KDParams(k=5)  # the default value is fine when not given explicitly
    assert "k" not in KDParams().to_dict()  # and is left out of the resolved config


def test_sections_accept_true_false_and_mappings():
    on = params_from_dict({"name": "kd", "tsm": True})
    assert on.tsm is not None and on.tsm.gamma == 1.0
    assert params_from_dict({"name": "kd", "tsm": False}).tsm is None
    assert params_from_dict({"name": "topkd", "tsm": None}).tsm is None
    assert params_from_dict({"name": "kd", "tsm": {"gamma": 2}}).tsm.gamma == 2.0


def test_create_method_forms_and_repr():
    m = create_method("dkd")
    assert m.name == "dkd" and m.params.beta == 8.0 and "beta=8.0" in repr(m)
    assert create_method({"name": "dkd", "beta": 2}).params.beta == 2.0
    assert create_method(m.params).params is m.params
    assert type(create_method("kd")).__name__ == "KD"


def test_topkd_methods_cli_lists_every_method(capsys):
    from topkd.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS.names():
        assert f"\n{name} " in "\n" + out
    assert main(["methods", "dkd"]) == 0
    out = capsys.readouterr().out
    assert "method.beta" in out and "default 8.0" in out and "method.tsm.gamma" in out
    assert main(["methods", "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("| method |")
    assert main(["methods", "dkdd"]) == 2
    assert "unknown method 'dkdd'" in capsys.readouterr().err


def test_docs_methods_table_is_current():
    from pathlib import Path

    from topkd.methods.table import update_docs

    doc = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
    assert update_docs(doc, check=True), \
        "docs/methods.md is stale: run `python -m topkd.methods.table docs/methods.md`"


@pytest.mark.parametrize("name", METHODS.names())
def test_trainable_modules_flag_matches_instances(name):
    torch.manual_seed(0)
    method, _ = example(METHODS.get(name).Params())
    has = any(p.requires_grad for p in method.parameters())
    assert has == METHODS.get(name).trainable_modules, name
