"""CAT-KD example: real resnet8 student and teacher (their classifiers make the CAMs) and their
float64 taps on a random input."""

from __future__ import annotations

from method_examples import EXAMPLES
from tapped_models import models, tapped_batch
from topkd.methods import MethodContext, method_class


def build(params):
    student, teacher = models()
    ctx = MethodContext(num_classes=10, student=student, teacher=teacher, input_size=(3, 32, 32))
    method = method_class(params)(params, ctx)
    return method, tapped_batch(method, student.train(), teacher.eval())


EXAMPLES["catkd"] = build
