"""FCFD example: real resnet8 student and teacher (FCFD runs parts of them; small bridges) and
their float64 taps on a random input, the teacher in eval mode (models and batch built once)."""

from __future__ import annotations

from functools import cache

from method_examples import EXAMPLES, RICH
from tapped_models import models, tapped_batch
from topkd.methods import MethodContext, method_class

# One s2t path per step: the drawn path always runs the teacher's stages (so teacher_bn has an
# effect), and extra_paths 1 -> 2 stays within the 2 candidates of a 4-stage pair.
RICH["fcfd"] = {"extra_type": "s2t", "extra_paths": 1}


@cache
def _setup():
    student, teacher = models("resnet8", "resnet8")
    probe = type("Probe", (), {"student_taps": ("feats",), "teacher_taps": ("feats",)})
    return student, teacher, tapped_batch(probe, student.train(), teacher.eval())


def build(params):
    student, teacher, batch = _setup()
    ctx = MethodContext(num_classes=10, student=student, teacher=teacher, input_size=(3, 32, 32))
    return method_class(params)(params, ctx).double(), batch


EXAMPLES["fcfd"] = build
