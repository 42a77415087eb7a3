"""SimKD example: real resnet8 student and teacher (the teacher's classifier is reused) and
their float64 taps on a random input."""

from __future__ import annotations

from method_examples import EXAMPLES, RICH
from tapped_models import models, tapped_batch
from topkd.methods import MethodContext, method_class

RICH["simkd"] = {"ce": 0.5}  # so that ignore_index (CE only) has an effect


def context(student: str = "resnet8", teacher: str = "resnet8", num_classes: int = 10
            ) -> MethodContext:
    s, t = models(student, teacher, num_classes)
    return MethodContext(num_classes=num_classes, student=s, teacher=t, input_size=(3, 32, 32))


def build(params):
    ctx = context()
    method = method_class(params)(params, ctx).double()
    return method, tapped_batch(method, ctx.student.train(), ctx.teacher.eval())


EXAMPLES["simkd"] = build
