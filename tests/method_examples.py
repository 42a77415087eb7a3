"""Example inputs for every registered method, used by the generic method tests.

``example(name, params) -> (method, batch)`` builds the method from ``params`` (a
:class:`topkd.methods.MethodParams`) and a small deterministic :class:`topkd.methods.Batch` it can
consume. Logit-only methods use :func:`logit_example`; a method that needs feature taps, sample
indices, extra views or trainable modules registers its own builder in :data:`EXAMPLES` (keyed by
method name) from its own module ``tests/examples/<method>.py`` (imported below), so that
``tests/test_method_params.py`` covers it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from topkd.methods import Batch, Method, MethodParams, ModelOutput, method_class

B, C = 8, 20
Example = Callable[[MethodParams], tuple[Method, Batch]]
EXAMPLES: dict[str, Example] = {}

#: Parameters to perturb in a "rich" configuration where every parameter has an effect:
#: ``RICH[name]`` (a config section without ``name``) is applied before perturbing. Methods whose
#: defaults already give every parameter an effect need no entry.
RICH: dict[str, dict[str, Any]] = {
    "kd": {"tsm": {}, "tdl": {}},
    "dkd": {"tsm": {}, "tdl": {}},
}


def logits(seed: int = 0, b: int = B, c: int = C) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """Student/teacher logits (float64) and labels with label 0 present and the teacher wrong on
    some rows (so TSM's correction and ``ignore_index=0`` both have an effect)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=torch.float64) * 3
    t = torch.randn(b, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (b,), generator=g)
    y[0] = 0
    y[1] = int(t[1].argmax())  # one row where the teacher is right
    return s, t, y


def logit_example(params: MethodParams, seed: int = 0) -> tuple[Method, Batch]:
    cls = method_class(params)
    s, t, y = logits(seed)
    teacher = ModelOutput(t) if cls.needs_teacher else None
    return cls(params), Batch(ModelOutput(s), teacher, y, epoch=1.0)


def is_logit_only(cls: type[Method]) -> bool:
    return not (cls.student_taps or cls.teacher_taps or cls.needs_index or cls.extra_views)


def example(params: MethodParams) -> tuple[Method, Batch]:
    cls = method_class(params)
    if cls.name in EXAMPLES:
        return EXAMPLES[cls.name](params)
    if not is_logit_only(cls):
        raise LookupError(f"method {cls.name!r} needs an entry in tests/method_examples.py")
    return logit_example(params)


def _load_examples() -> None:
    import importlib
    import pkgutil
    from pathlib import Path

    folder = Path(__file__).resolve().parent / "examples"
    for m in sorted(pkgutil.iter_modules([str(folder)]), key=lambda m: m.name):
        importlib.import_module(f"examples.{m.name}")


_load_examples()
