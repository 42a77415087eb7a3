"""Hand-made feature tensors and a model-free :class:`MethodContext` for feature-method tests.

``feature_batch(student_shapes, teacher_shapes)`` builds a :class:`Batch` whose student and
teacher carry ``feats`` (lists of ``(B, C, H, W)``), ``pooled_feat`` and logits, as the engine's
feature taps provide them; ``ShapesContext`` answers ``feature_shapes`` from given per-sample
shapes, so methods with trainable modules can be built without models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from topkd.methods import Batch, MethodContext, ModelOutput

B = 6
# Per-sample shapes in the style of mdistiller's CIFAR nets: stem, then three stages.
STUDENT = {"feats": [(4, 8, 8), (4, 8, 8), (8, 4, 4), (16, 2, 2)], "pooled_feat": (16,)}
TEACHER = {"feats": [(8, 8, 8), (8, 8, 8), (16, 4, 4), (32, 2, 2)], "pooled_feat": (32,)}
# A cross-architecture pair: the student's stages are half the teacher's size (ShuffleNet and
# MobileNetV2 students of ResNet teachers), one more stage in the teacher.
SMALL_STUDENT = {"feats": [(4, 8, 8), (6, 4, 4), (10, 2, 2), (12, 1, 1)], "pooled_feat": (12,)}
DEEP_TEACHER = {"feats": [(8, 8, 8), (8, 8, 8), (16, 4, 4), (32, 2, 2), (32, 2, 2)],
                "pooled_feat": (32,)}


@dataclass
class ShapesContext(MethodContext):
    """A :class:`MethodContext` whose ``feature_shapes`` come from ``shapes`` (no models)."""

    shapes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def feature_shapes(self, which: str, kinds: tuple[str, ...]) -> dict[str, Any]:
        return {k: self.shapes[which][k] for k in kinds}


def context(student: dict[str, Any] = STUDENT, teacher: dict[str, Any] = TEACHER,
            num_classes: int = 20) -> ShapesContext:
    return ShapesContext(num_classes=num_classes, input_size=(3, 32, 32),
                         shapes={"student": student, "teacher": teacher})


def _feats(shapes: dict[str, Any], b: int, g: torch.Generator, dtype: torch.dtype,
           grad: bool) -> dict[str, Any]:
    # Non-negative like post-ReLU stage outputs, with some exact zeros.
    def one(shape: tuple[int, ...]) -> torch.Tensor:
        x = torch.randn(b, *shape, generator=g, dtype=dtype).clamp_min(-0.3) + 0.3
        return x.requires_grad_(grad)

    return {"feats": [one(s) for s in shapes["feats"]], "pooled_feat": one(shapes["pooled_feat"])}


def feature_batch(student: dict[str, Any] = STUDENT, teacher: dict[str, Any] = TEACHER, *,
                  b: int = B, num_classes: int = 20, seed: int = 0,
                  dtype: torch.dtype = torch.float64, grad: bool = False) -> Batch:
    """A batch with label 0 present (so ``ignore_index=0`` drops a row) and epoch 1."""
    g = torch.Generator().manual_seed(seed)
    s = _feats(student, b, g, dtype, grad)
    t = _feats(teacher, b, g, dtype, False)
    ls = torch.randn(b, num_classes, generator=g, dtype=dtype).requires_grad_(grad)
    lt = torch.randn(b, num_classes, generator=g, dtype=dtype)
    y = torch.randint(0, num_classes, (b,), generator=g)
    y[0] = 0
    return Batch(ModelOutput(ls, s), ModelOutput(lt, t), y, epoch=1.0)


def example_builder(name: str, student: dict[str, Any] = STUDENT,
                    teacher: dict[str, Any] = TEACHER, b: int = B, perturb=None, tweak=None):
    """An ``EXAMPLES`` entry: the method on ``context(student, teacher)`` and a float64 batch.

    ``perturb(method, params)`` may move the method's parameters away from their initial values
    (e.g. trained variances) and ``tweak(batch)`` edit the features in place, so that
    parameters acting only in such states have an effect."""
    from topkd.methods import method_class

    def build(params):
        cls = method_class(params)
        method = cls(params, context(student, teacher)).double()
        if perturb is not None:
            with torch.no_grad():
                perturb(method, params)
        batch = feature_batch(student, teacher, b=b)
        if tweak is not None:
            with torch.no_grad():
                tweak(batch)
        return method, batch

    return build


def leaves(batch: Batch, kind: str = "feats") -> list[torch.Tensor]:
    """The student's tensors of ``kind`` (a list) that require grad."""
    v = batch.student.feats[kind]
    return list(v) if isinstance(v, list) else [v]


def assert_same_loss_and_grads(ours: torch.Tensor, ref: torch.Tensor,
                               wrt: list[torch.Tensor], rtol: float = 1e-6,
                               atol: float = 1e-9) -> None:
    """``ours == ref`` and their gradients w.r.t. ``wrt`` agree (float64, relative 1e-6).

    Inputs that one side does not use must get no gradient from the other either."""
    torch.testing.assert_close(ours, ref.reshape(ours.shape), rtol=rtol, atol=atol)
    g_ours = torch.autograd.grad(ours, wrt, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad(ref.sum(), wrt, retain_graph=True, allow_unused=True)
    assert any(g is not None for g in g_ref), "the reference has no gradient w.r.t. these inputs"
    for i, (a, b) in enumerate(zip(g_ours, g_ref)):
        a = torch.zeros_like(wrt[i]) if a is None else a
        b = torch.zeros_like(wrt[i]) if b is None else b
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"grad {i}: {m}")
