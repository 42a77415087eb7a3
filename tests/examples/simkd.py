"""SimKD example: a resnet8 student and teacher (real models: the teacher's classifier is reused)
and random float64 last-stage maps of their shapes."""

from __future__ import annotations

import torch

from method_examples import EXAMPLES, RICH
from topkd.methods import Batch, MethodContext, ModelOutput, method_class
from topkd.models import create_model

RICH["simkd"] = {"ce": 0.5}  # so that ignore_index (CE only) has an effect


def context(student: str = "resnet8", teacher: str = "resnet8", num_classes: int = 10
            ) -> MethodContext:
    return MethodContext(num_classes=num_classes, student=create_model(student, num_classes),
                         teacher=create_model(teacher, num_classes), input_size=(3, 32, 32))


def batch(s_shape, t_shape, num_classes: int = 10, b: int = 4, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(b, *s_shape, generator=g, dtype=torch.float64).relu()
    ft = torch.randn(b, *t_shape, generator=g, dtype=torch.float64).relu()
    ls = torch.randn(b, num_classes, generator=g, dtype=torch.float64)
    lt = torch.randn(b, num_classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, num_classes, (b,), generator=g)
    y[0] = 0
    return Batch(ModelOutput(ls, {"feats": [fs]}), ModelOutput(lt, {"feats": [ft]}), y, epoch=1.0)


def build(params):
    method = method_class(params)(params, context()).double()
    return method, batch((64, 8, 8), (64, 8, 8))


EXAMPLES["simkd"] = build
