"""Input checking and row flattening shared by every loss.

Shape, dtype and option checks are free (no device sync). The data-dependent checks (NaN/inf
logits, labels out of range) are fused into one boolean reduction and a single ``.item()``, so a
checked call costs one host sync; ``validate=False`` skips even that (for hot loops that already
trust their inputs). Only when the fused check fails do we spend more syncs to build a precise
message.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
SCHEDULES = ("linear", "constant")


def as_compute(x: Tensor) -> Tensor:
    """Upcast half precision: softmax, logs and cosines run in float32 (autocast-safe)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_reduction(fn: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_schedule(fn: str, schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"{fn}: schedule must be one of {SCHEDULES}, got {schedule!r}")


def check_positive(fn: str, name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{fn}: {name} must be a number > 0, got {value!r}")


def check_nonneg(fn: str, name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{fn}: {name} must be a number >= 0, got {value!r}")


def check_weights(fn: str, **weights: float) -> None:
    """Loss weights are numbers >= 0: a negative weight would turn a distance into a reward
    (the criterion's spec rejects them too, so both APIs accept the same values)."""
    for name, value in weights.items():
        check_nonneg(fn, name, value)


def check_k(fn: str, k: int, num_classes: int, *, two_sided: bool) -> None:
    """``1 <= k`` and ``2k <= C`` (TDL/TopKD: disjoint top and bottom k) or ``k <= C`` (TSM)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"{fn}: k must be an int, got {k!r}")
    hi = num_classes // 2 if two_sided else num_classes
    rule = "2*k <= C" if two_sided else "k <= C"
    if not 1 <= k <= hi:
        raise ValueError(f"{fn}: k must satisfy 1 <= k and {rule} (C={num_classes}), got k={k}")


def check_k_int(fn: str, k: int) -> None:
    """The part of :func:`check_k` that needs no ``C`` (module/spec construction time)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{fn}: k must be an int >= 1, got {k!r}")


def _check_logits(fn: str, what: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{fn}: {what} logits must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{fn}: {what} logits must be floating point, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(
            f"{fn}: {what} logits must have shape (..., C) with C >= 1, got {tuple(x.shape)}"
        )


class Rows(NamedTuple):
    """Logits flattened to ``(N, C)`` rows, labels ``(N,)`` int64, the kept-row mask or None."""

    s: Tensor
    t: Tensor | None
    y: Tensor | None
    keep: Tensor | None
    lead: torch.Size


def prepare(
    fn: str,
    s: Tensor,
    t: Tensor | None = None,
    y: Tensor | None = None,
    *,
    ignore_index: int | None = None,
    validate: bool = True,
    need_labels: bool = False,
    what: str = "student",
) -> Rows:
    """Check inputs and flatten ``(..., C)`` logits to rows.

    ``t`` is detached (the teacher never receives gradient). Integer labels ``(...)`` are
    flattened; float labels of the logits' shape are probabilities and reduce to their argmax.
    Rows whose label equals ``ignore_index`` are marked in ``keep`` and get a placeholder label
    0 so that gathers stay in range; losses zero them before reducing.
    """
    _check_logits(fn, what, s)
    C = s.shape[-1]
    lead = s.shape[:-1]
    s2 = s.reshape(-1, C)
    t2 = None
    if t is not None:
        _check_logits(fn, "teacher", t)
        if t.shape != s.shape:
            raise ValueError(
                f"{fn}: student and teacher logits must have the same shape, "
                f"got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        t2 = t.detach().reshape(-1, C)
    y2 = keep = None
    if y is None:
        if need_labels:
            raise ValueError(f"{fn}: labels are required")
    else:
        if not isinstance(y, Tensor):
            raise ValueError(f"{fn}: labels must be a torch.Tensor, got {type(y).__name__}")
        if y.is_floating_point():
            if y.shape != s.shape:
                raise ValueError(
                    f"{fn}: probability labels must have the logits' shape {tuple(s.shape)}, "
                    f"got {tuple(y.shape)}"
                )
            y2 = y.detach().reshape(-1, C).argmax(-1)
        elif y.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            if y.shape != lead:
                raise ValueError(
                    f"{fn}: labels must have shape {tuple(lead)} (logits {tuple(s.shape)} "
                    f"without the class dim), got {tuple(y.shape)}"
                )
            y2 = y.reshape(-1).long()
            if ignore_index is not None:
                keep = y2 != ignore_index
        else:
            raise ValueError(f"{fn}: labels must be integer class indices, got dtype {y.dtype}")

    if validate:
        # NaN/inf propagate through a sum, so one read pass per tensor replaces isfinite().all()
        # (which is ~10x slower on CPU); an overflowing sum of finite values only sends us to
        # the exact (slow) path, which then finds nothing wrong.
        ok = torch.isfinite(s2.detach().sum() if t2 is None else s2.detach().sum() + t2.sum())
        if y2 is not None and y2.numel():
            lo, hi = torch.aminmax(torch.where(keep, y2, 0) if keep is not None else y2)
            ok = ok & (lo >= 0) & (hi < C)
        if not bool(ok):  # the one host sync of a checked call
            _diagnose(fn, s2, t2, y2, keep, C, ignore_index, what)
    if keep is not None:
        y2 = torch.where(keep, y2, 0)
    return Rows(s2, t2, y2, keep, lead)


def _diagnose(fn, s2, t2, y2, keep, C, ignore_index, first_name) -> None:
    for what, x in ((first_name, s2), ("teacher", t2)):
        if x is None:
            continue
        bad = ~torch.isfinite(x.detach())
        if bool(bad.any()):
            first = x.detach()[bad][0].item()
            raise ValueError(
                f"{fn}: {what} logits contain {int(bad.sum())} non-finite value(s) (NaN/inf), "
                f"e.g. {first}"
            )
    if y2 is None:
        return  # a false alarm of the fused check (overflowing sum of finite logits)
    bad = (y2 < 0) | (y2 >= C)
    if keep is not None:
        bad &= keep
    if not bool(bad.any()):
        return
    first = int(y2[bad][0])
    extra = f" (ignore_index={ignore_index} excepted)" if ignore_index is not None else ""
    hint = ""
    if first < 0 and ignore_index is None:  # e.g. -100, the usual "no label" marker
        hint = (f"; if {first} marks rows to skip, pass ignore_index={first} "
                f"(in a config: method.ignore_index={first})")
    raise ValueError(
        f"{fn}: labels must be in [0, {C}){extra}; got {int(bad.sum())} out of range, e.g. {first}"
        + hint
    )


def reduce_rows(loss: Tensor, keep: Tensor | None, lead: torch.Size, reduction: str) -> Tensor:
    """Apply ``reduction`` to per-row losses; ignored rows count as 0 and not in the mean.

    ``mean`` divides by the number of kept rows clamped at 1, so an empty or all-ignored batch
    gives 0 (still attached to the graph) instead of NaN.
    """
    if keep is not None:
        loss = torch.where(keep, loss, 0.0)
    if reduction == "none":
        return loss.reshape(lead)
    total = loss.sum()
    if reduction == "sum":
        return total
    n = keep.sum().clamp_min(1) if keep is not None else max(loss.numel(), 1)
    return total / n
