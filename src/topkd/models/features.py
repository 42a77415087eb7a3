"""Feature taps: intermediate features of any zoo model, read by forward hooks.

Feature-based distillation (FitNet, AT, RKD, PKT, SP, VID, NST, OFD, KDSVD, CRD, ReviewKD, ...)
needs the tensors mdistiller's models return next to their logits::

    feats        list of (B, C_i, H_i, W_i): the stem output, then every stage's output
    preact_feats list of (B, C_i, H_i, W_i): the same places before their final ReLU
    pooled_feat  (B, D): the pooled penultimate features, the classifier's input

>>> model = create_model("resnet8x4", 100)
>>> taps = FeatureTaps(model, ["feats", "pooled_feat"])
>>> logits, f = taps(x)          # one forward; f["feats"][i], f["pooled_feat"]
>>> taps.remove()                # or: with FeatureTaps(model, kinds) as taps: ...

Each model declares where its taps are with ``feature_taps()``: a mapping from kind to
:class:`Tap` (the output, or input, of a named submodule). Where a tensor is no module's output
(e.g. ``F.relu(out + shortcut)`` in a residual block) the model routes it through a
:class:`TapPoint`, a parameter-free identity that adds no state_dict keys. Only the requested kinds
get hooks, so a model whose taps are not requested runs exactly as without them.

The tensors are the very tensors the forward computes (no second forward, no copy except where a
later in-place op would overwrite them, see :attr:`Tap.clone`), so they keep autograd.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

TAP_KINDS = ("feats", "preact_feats", "pooled_feat")
_LIST_KINDS = ("feats", "preact_feats")


@dataclass(frozen=True)
class Tap:
    """Where one feature is read during ``forward``.

    Attributes:
        module: the submodule's name in ``model.named_modules()``.
        input: read the module's first positional input instead of its output.
        clone: copy the tensor when it is read, because the forward later modifies it in place
            (e.g. a BatchNorm output followed by ``ReLU(inplace=True)``). The copy is
            differentiable.
        call: which call of the module within one forward to read (0-based), for modules the
            forward calls several times (torchvision blocks reuse one ``relu``). With the default
            0 the module must be called exactly once per forward.
    """

    module: str
    input: bool = False
    clone: bool = False
    call: int = 0


TapSpec = Tap | str | Sequence[Tap | str]  # one tap, or one per list element


class TapPoint(nn.Module):
    """Identity that marks a tensor for :class:`FeatureTaps`; no parameters, no state_dict keys.

    ``active`` is true while a hook is registered on it, so a forward can build a tensor that
    exists only to be tapped (e.g. a concatenation) only when someone reads it.
    """

    def forward(self, x: Any) -> Any:
        return x

    @property
    def active(self) -> bool:
        return bool(self._forward_hooks)


def module_name(model: nn.Module, target: nn.Module) -> str:
    """The name of ``target`` in ``model.named_modules()`` (``ValueError`` if absent)."""
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def classifier_input_tap(model: nn.Module) -> Tap:
    """The input of ``model.get_classifier()``: the pooled (pre-logits) features."""
    clf = model.get_classifier()  # type: ignore[operator]
    if not isinstance(clf, nn.Module):
        raise TypeError(f"{type(model).__name__}.get_classifier() is not a single nn.Module")
    return Tap(module_name(model, clf), input=True)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The raw module inside ``DistributedDataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.DataParallel):
            raise TypeError(
                "FeatureTaps does not support nn.DataParallel (its replicas run the hooks in "
                "parallel threads); use DistributedDataParallel"
            )
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile wrapper
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _is_compiled(model: nn.Module) -> bool:
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            return True
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            return False
        model = model.module


def _as_tap(t: Tap | str) -> Tap:
    if isinstance(t, str):
        return Tap(t)
    if not isinstance(t, Tap):
        raise TypeError(f"a tap must be a Tap or a module name, got {type(t).__name__}")
    return t


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        raise TypeError(f"kinds must be an iterable of kind names, not the string {kinds!r}; "
                        f"write [{kinds!r}]")
    out: list[str] = []
    for k in kinds:
        if k not in TAP_KINDS:
            close = difflib.get_close_matches(str(k), TAP_KINDS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown feature kind {k!r}; allowed: {', '.join(TAP_KINDS)}.{hint}")
        if k not in out:
            out.append(k)
    return tuple(out)


def _tap_spec(model: nn.Module) -> Mapping[str, TapSpec]:
    fn = getattr(model, "feature_taps", None)
    if not callable(fn):
        raise TypeError(
            f"{type(model).__name__} declares no feature taps: give it a feature_taps() method "
            "returning {kind: Tap | [Tap, ...]} (see topkd.models.features)"
        )
    return fn()


class FeatureTaps:
    """Run a model and return ``(logits, {kind: features})`` for the requested ``kinds``.

    Args:
        model: a zoo model, or a ``DistributedDataParallel`` / ``torch.compile`` wrapper of one.
            Hooks go on the raw module inside (where the tap names live); the forward goes through
            ``model`` itself, so DDP's gradient synchronisation and compiled code are used.
        kinds: any of :data:`TAP_KINDS`. Taps not requested get no hook and cost nothing;
            ``FeatureTaps(model, ())`` is the bare model.

    Calling returns the logits and a dict with exactly the requested kinds: ``feats`` and
    ``preact_feats`` as lists of ``(B, C, H, W)`` tensors, ``pooled_feat`` as ``(B, D)``. The hooks
    record only inside this call, so calling ``model`` directly (e.g. for validation) keeps nothing.
    Attributes: ``model`` (as given), ``raw_model`` (the hooked module), ``kinds``.

    Raises:
        ValueError: an unknown kind, or a kind the model has no tap points for.
        TypeError: a model without ``feature_taps()``.
        RuntimeError: at call time, when a tap was not reached, reached more often than declared,
            or modified in place after it was read (a tap declaration that needs ``clone=True``).

    With ``torch.compile``, create the taps before the first compiled call and keep them for the
    model's life: dynamo does not guard on hook dictionaries (``skip_nnmodule_hook_guards``), so
    code compiled without the hooks keeps running without them (taps then fail as "not
    reached"). Calls outside the taps cost one guarded branch per hook in compiled code.
    """

    def __init__(self, model: nn.Module, kinds: Iterable[str]) -> None:
        self.kinds = _check_kinds(kinds)
        self.model = model
        raw = unwrap_model(model)
        self.raw_model = raw
        self._handles: list[Any] = []
        self._armed = False
        self._removed = False
        self._values: dict[tuple[str, int], Any] = {}
        self._counts: dict[tuple[str, bool], int] = {}
        self._versions: dict[tuple[str, int], list[int]] = {}
        if not self.kinds:
            return
        spec = _tap_spec(raw)
        missing = [k for k in self.kinds if k not in spec]
        if missing:
            has = ", ".join(k for k in TAP_KINDS if k in spec) or "none"
            raise ValueError(
                f"{type(raw).__name__} has no tap points for {', '.join(map(repr, missing))} "
                f"(it declares: {has})"
            )
        modules = dict(raw.named_modules())
        # slot (kind, index) -> Tap; per hooked (module, input) site: {call: [slots]}
        self._layout: dict[str, int | None] = {}
        sites: dict[tuple[str, bool], dict[int, list[tuple[tuple[str, int], bool]]]] = {}
        self._slot_tap: dict[tuple[str, int], Tap] = {}
        for kind in self.kinds:
            entry = spec[kind]
            if isinstance(entry, (Tap, str)):
                taps = [_as_tap(entry)]
                self._layout[kind] = None  # one tap: its value is the feature (or the list)
            else:
                taps = [_as_tap(t) for t in entry]
                if kind == "pooled_feat" or not taps:
                    raise ValueError(f"{type(raw).__name__}.feature_taps()[{kind!r}] must be "
                                     f"{'one Tap' if kind == 'pooled_feat' else 'non-empty'}")
                self._layout[kind] = len(taps)
            for i, tap in enumerate(taps):
                if tap.module not in modules:
                    raise ValueError(
                        f"{type(raw).__name__}.feature_taps()[{kind!r}] names {tap.module!r}, "
                        "which is not a submodule"
                    )
                slot = (kind, i)
                self._slot_tap[slot] = tap
                site = sites.setdefault((tap.module, tap.input), {})
                site.setdefault(tap.call, []).append((slot, tap.clone))
        self._sites = sites
        for (name, is_input), by_call in sites.items():
            mod = modules[name]
            hook = self._make_hook(name, is_input, by_call)
            if is_input:
                self._handles.append(mod.register_forward_pre_hook(hook))
            else:
                self._handles.append(mod.register_forward_hook(hook))

    def _make_hook(self, name: str, is_input: bool,
                   by_call: dict[int, list[tuple[tuple[str, int], bool]]]) -> Any:
        key = (name, is_input)

        def record(value: Any, slots: list[tuple[tuple[str, int], bool]]) -> None:
            for slot, clone in slots:
                v = [t.clone() for t in value] if clone and isinstance(value, (list, tuple)) \
                    else value.clone() if clone else value
                self._values[slot] = v
                if not torch.compiler.is_compiling():  # compiled graphs have no in-place aliasing
                    ts = v if isinstance(v, (list, tuple)) else [v]
                    self._versions[slot] = [-1 if t.is_inference() else t._version for t in ts]

        if is_input:
            def pre_hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
                if self._armed:
                    n = self._counts.get(key, 0)
                    self._counts[key] = n + 1
                    if n in by_call:
                        record(args[0], by_call[n])
            return pre_hook

        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._armed:
                n = self._counts.get(key, 0)
                self._counts[key] = n + 1
                if n in by_call:
                    record(output, by_call[n])
        return hook

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor | list[Tensor]]]:
        if self._removed:
            raise RuntimeError("these FeatureTaps were removed; create new ones")
        if not self.kinds:
            return self.model(x), {}
        if self._armed:
            raise RuntimeError("FeatureTaps called re-entrantly (from inside its own forward)")
        self._values, self._counts, self._versions = {}, {}, {}
        self._armed = True
        try:
            logits = self.model(x)
        finally:
            self._armed = False
            values, self._values = self._values, {}  # keep no reference after the call
        self._check(values)
        out: dict[str, Tensor | list[Tensor]] = {}
        for kind in self.kinds:
            n = self._layout[kind]
            if n is None:
                v = values[(kind, 0)]
                if (kind in _LIST_KINDS) != isinstance(v, (list, tuple)):
                    name = self._slot_tap[(kind, 0)].module
                    raise RuntimeError(
                        f"the single tap declared for {kind!r} ({name!r}) "
                        f"gave a {type(v).__name__}; {kind} needs "
                        f"{'a list of tensors' if kind in _LIST_KINDS else 'one tensor'}"
                    )
                out[kind] = list(v) if kind in _LIST_KINDS else v
            else:
                out[kind] = [values[(kind, i)] for i in range(n)]
        return logits, out

    def _check(self, values: dict[tuple[str, int], Any]) -> None:
        for (name, is_input), by_call in self._sites.items():
            where = f"{'input' if is_input else 'output'} of {name!r}"
            n = self._counts.get((name, is_input), 0)
            last = max(by_call)
            if n <= last:
                hint = (" (a torch.compile'd model must get its FeatureTaps before its first call)"
                        if n == 0 and _is_compiled(self.model) else "")
                raise RuntimeError(f"feature tap at the {where} was not reached in forward "
                                   f"(called {n} time(s), tap reads call {last}){hint}")
            if last == 0 and n != 1:
                raise RuntimeError(f"the {where} is produced {n} times per forward; its Tap must "
                                   "say which call to read (Tap.call)")
        for slot, versions in self._versions.items():
            v = values[slot]
            ts = v if isinstance(v, (list, tuple)) else [v]
            if any(old != -1 and t._version != old for t, old in zip(ts, versions)):
                tap = self._slot_tap[slot]
                raise RuntimeError(
                    f"feature tap {slot[0]}[{slot[1]}] ({tap.module!r}) was modified in place "
                    "after it was read; declare it with Tap(..., clone=True)"
                )

    def remove(self) -> None:
        """Remove the hooks (idempotent). The model then runs as if never tapped."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._removed = True

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def feature_shapes(
    model: nn.Module, input_size: tuple[int, int, int], kinds: Iterable[str]
) -> dict[str, list[tuple[int, ...]] | tuple[int, ...]]:
    """Per-sample shapes of the requested features, from one dummy forward.

    The forward runs on a ``(2, *input_size)`` batch of zeros, in eval mode, without gradients, on
    the model's device and dtype; every submodule's train/eval flag is restored afterwards.
    Returns ``{"feats": [(C, H, W), ...], "pooled_feat": (D,), ...}`` (no batch dimension).
    """
    kinds = _check_kinds(kinds)
    raw = unwrap_model(model)
    ref = next(iter(raw.parameters()), None)
    if ref is None:
        ref = next(iter(raw.buffers()), torch.zeros(()))
    x = torch.zeros(2, *input_size, device=ref.device, dtype=ref.dtype)
    modes = [(m, m.training) for m in raw.modules()]
    raw.eval()
    try:
        with torch.no_grad(), FeatureTaps(raw, kinds) as taps:
            _, feats = taps(x)
    finally:
        for m, mode in modes:
            m.training = mode
    return {
        k: [tuple(t.shape[1:]) for t in v] if isinstance(v, list) else tuple(v.shape[1:])
        for k, v in feats.items()
    }
