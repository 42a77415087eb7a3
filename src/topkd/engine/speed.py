"""The engine's speed switches: ``train.amp``, ``train.channels_last``, ``train.compile``.

Each is ``auto`` by default and resolved here, once per run, from the device and the models
(docs/training.md, "Speed"; the measurements behind each rule are in docs/benchmarks.md):

==========================  ===================================================================
``amp: auto``               bf16 autocast on CUDA GPUs that support bf16, fp32 elsewhere
                            (an explicit ``bf16`` also runs on the CPU)
``channels_last: auto``     on when the student or the teacher has 2-D convolutions
``compile: auto``           ``torch.compile`` of the student, the teacher and the method's loss
                            on CUDA; eager on the CPU, where a cold compile (42-66 s per
                            pair on the 2-core box) costs more than it gains (0.90-1.10x)
==========================  ===================================================================

:class:`CompiledOrEager` is how every compiled component runs: ``torch.compile(fn,
fullgraph=True)`` (the whole function is one graph, so nothing of a call has run when
compilation fails), and on any error of a compiled call the same call is redone eagerly and
the component stays eager for the rest of the run, after a one-line notice. A real error of
the code itself then surfaces as the eager error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["COMPILE_OPTIONS", "CompiledOrEager", "compile_method", "is_convolutional",
           "resolve_amp", "resolve_channels_last", "resolve_compile"]


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (``None``: fp32).

    ``auto``: bf16 on CUDA GPUs that support it. An explicit ``bf16`` also works on the CPU
    (autocast ``cpu``: fast on CPUs with bf16 matrix units such as AMX, docs/benchmarks.md);
    ``fp16`` is CUDA-only (``None`` elsewhere: the caller warns).
    """
    if setting == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setting)
    if device.type == "cuda" or (device.type == "cpu" and dtype is torch.bfloat16):
        return dtype
    return None


def is_convolutional(*models: nn.Module | None) -> bool:
    """Whether any of ``models`` has a 2-D convolution (channels_last helps those)."""
    return any(isinstance(m, nn.Conv2d) for model in models if model is not None
               for m in model.modules())


def resolve_channels_last(setting: bool | str, *models: nn.Module | None) -> bool:
    """``train.channels_last``: ``auto`` = the student or the teacher is convolutional."""
    return is_convolutional(*models) if setting == "auto" else bool(setting)


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """``train.compile``: ``auto`` = on CUDA (see the module docstring)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


#: Extra ``torch.compile`` arguments of every :class:`CompiledOrEager` (e.g. a test's
#: ``{"backend": "aot_eager"}``, which traces like inductor but generates no code).
COMPILE_OPTIONS: dict[str, Any] = {}


def _notice(msg: str) -> None:
    print(f"topkd: notice: {msg}", file=sys.stderr, flush=True)


class CompiledOrEager:
    """``fn`` through ``torch.compile(fn, fullgraph=True)``, falling back to eager for good on
    the first failure (one-line notice naming ``name`` and the error).

    For an ``nn.Module`` the compiled wrapper's ``_orig_mod`` is exposed, so
    :class:`~topkd.models.features.FeatureTaps` hooks the raw module inside.
    """

    def __init__(self, fn: Callable[..., Any], name: str, **compile_kw: Any) -> None:
        self.eager, self.name = fn, name
        kw = {"fullgraph": True, **COMPILE_OPTIONS, **compile_kw}
        self.compiled: Callable[..., Any] | None = torch.compile(fn, **kw)
        if isinstance(fn, nn.Module):
            self._orig_mod = fn
        self.error: BaseException | None = None

    @property
    def is_compiled(self) -> bool:
        """False once the component fell back to eager."""
        return self.compiled is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager call decides
            out = self.eager(*args, **kwargs)  # a real error of the code raises here
            self.compiled, self.error = None, e
            first = (str(e).strip().splitlines() or [""])[0][:160]
            _notice(f"torch.compile of {self.name} failed ({type(e).__name__}: {first}); "
                    "running it eagerly (train.compile=false turns compilation off)")
            return out


def compile_method(method: nn.Module) -> list[CompiledOrEager]:
    """Compile the loss computation of ``method`` in place: its ``task_loss`` and ``distill``
    (the tensor work of :meth:`topkd.methods.Method.forward`; the warm-up factor, a Python
    number of the epoch, stays outside so that a new epoch needs no recompilation). Each part
    falls back to eager on its own. Returns the wrappers."""
    parts = []
    for attr in ("task_loss", "distill"):
        fn = getattr(method, attr)
        if attr == "distill" and not getattr(method, "needs_teacher", True):
            continue
        w = CompiledOrEager(fn, f"the {getattr(method, 'name', '')} method's {attr}")
        object.__setattr__(method, attr, w)  # instance attribute: Method.forward calls it
        parts.append(w)
    return parts
