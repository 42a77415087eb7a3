"""CAT-KD example: real resnet8 student and teacher (their classifiers make the CAMs) and their
float64 taps on a random input."""

from __future__ import annotations

import torch

from method_examples import EXAMPLES
from topkd.methods import Batch, MethodContext, ModelOutput, method_class
from topkd.models import create_model
from topkd.models.features import FeatureTaps


def models(student: str = "resnet8", teacher: str = "resnet8", num_classes: int = 10):
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(0)
        return (create_model(student, num_classes).double(),
                create_model(teacher, num_classes).double())


def tapped_batch(method, student, teacher, num_classes: int = 10, b: int = 4, seed: int = 0,
                 grad: bool = False) -> Batch:
    """The models' outputs on a random input (in the models' dtype), through the taps the
    method asked for."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 32, 32, generator=g, dtype=next(student.parameters()).dtype)
    with FeatureTaps(student, method.student_taps) as taps:
        ls, fs = taps(x)
    with torch.no_grad(), FeatureTaps(teacher, method.teacher_taps) as taps:
        lt, ft = taps(x)
    if not grad:
        ls, fs = ls.detach(), {k: [t.detach() for t in v] if isinstance(v, list) else v.detach()
                               for k, v in fs.items()}
    y = torch.randint(0, num_classes, (b,), generator=g)
    y[0] = 0
    return Batch(ModelOutput(ls, fs), ModelOutput(lt, ft), y, epoch=1.0)


def build(params):
    student, teacher = models()
    ctx = MethodContext(num_classes=10, student=student, teacher=teacher, input_size=(3, 32, 32))
    method = method_class(params)(params, ctx)
    return method, tapped_batch(method, student.train(), teacher.eval())


EXAMPLES["catkd"] = build
